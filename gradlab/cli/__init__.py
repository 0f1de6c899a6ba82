"""The ``gradlab`` command: a thin shell over the library.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``gradlab analyze`` never imports torch.

One top-level error path (:func:`main`): bad input raises :class:`gradlab.errors.UsageError`, printed as one line
with exit code 2; an exception inside the user's own factory (:class:`gradlab.errors.UserCodeError`) is one line
naming the exception and the user's frames only, exit 2; an environment failure (permission denied, read-only filesystem,
full disk, missing file: ``OSError`` or :class:`gradlab.errors.EnvironmentProblem`) is one line naming the cause
and the fix, exit code 1.  ``--debug`` re-raises instead, showing the full traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Sequence

from gradlab.errors import EnvironmentProblem, UsageError

# An explicit registry: subcommand -> (module, one-line help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gradlab.cli.train", "train one run or a grid, saving init/early/late checkpoints"),
    "probe": ("gradlab.cli.probe", "summed-gradient norms for every batch size into a resumable zarr store"),
    "analyze": ("gradlab.cli.analyze", "statistics, law fits with intervals, and figures from stores"),
    "sharpness": ("gradlab.cli.sharpness", "Hessian eigenvalues, trace and epsilon-sharpness of checkpoints"),
    "cbs": ("gradlab.cli.cbs", "critical batch size: branch from checkpoints at every batch size of a grid"),
    "demo": ("gradlab.cli.demo", "the whole study on the embedded digits: train, probe, sharpness, analyze"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """argparse's own usage errors (unknown flag, bad choice, two flags of a mutually exclusive group): one line
        naming the problem and where the usage is, exit 2 -- the same shape as every other gradlab error, not
        argparse's multi-line usage block."""
        hint = f"see '{self.prog} --help'"
        if " not allowed with argument " in message:  # a mutually exclusive group: say what to do
            hint = f"give only one of them ({hint})"
        elif message.endswith("expected one argument"):  # e.g. --batch-sizes -4,4: the value looks like a flag
            hint = f"a value that starts with '-' must be attached with '=', e.g. --flag=-1 ({hint})"
        self.exit(2, f"gradlab: error: {_one_line(message)}; {hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradlab", description="How mini-batch size shapes gradient dynamics.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of any error")
        importlib.import_module(module).add_arguments(p)
    return parser


_FIXES = {
    errno.EACCES: "permission denied; choose a path you can write (or read), or change its permissions",
    errno.EPERM: "operation not permitted; choose a path you own, or change its permissions",
    errno.EROFS: "the filesystem is read-only; choose --out on a writable filesystem",
    errno.ENOSPC: "no space left on the device; free some space or choose --out on another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose --out on another disk",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a component of the path is a file, not a folder; check the path",
    errno.EISDIR: "the path is a folder, not a file; check the path",
    errno.EEXIST: "the path already exists; choose another --out",
    errno.ENAMETOOLONG: "the file name is too long; choose a shorter path",
}


def describe_os_error(exc: OSError) -> str:
    """One line naming what the environment refused, on which path, and how to fix it."""
    where = " ".join(repr(str(f)) for f in (exc.filename, exc.filename2) if f is not None)
    fix = _FIXES.get(exc.errno or -1)
    cause = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{cause}{': ' + where if where else ''}" + (f" ({fix})" if fix else "")


def _named_modules(args: argparse.Namespace) -> set[str]:
    """The files of the user modules the command line names (``--model``/``--data``/``--loss``/``--collate``
    ``pkg.module:attr``), as far as they are imported."""
    files = set()
    for key in ("model", "data", "loss", "collate"):
        spec = getattr(args, key, None)
        if isinstance(spec, str) and ":" in spec and not spec.startswith("live:"):
            mod = sys.modules.get(spec.split(":", 1)[0])
            if getattr(mod, "__file__", None):
                from pathlib import Path

                files.add(str(Path(mod.__file__).resolve()))
    return files


def user_code_failure(exc: BaseException, user_files: set[str]) -> str | None:
    """One line for an exception raised in the user's own code while a command runs (a ``--loss`` or a model's
    ``forward`` failing on one batch, say): the innermost frame that is neither Python's nor an installed
    package's is in one of ``user_files`` (the modules the command names).  None otherwise: gradlab's own
    failure (or code it was not told about) keeps its traceback."""
    import traceback
    from pathlib import Path

    from gradlab.errors import _GRADLAB_DIR, _SYSTEM_DIRS

    def kind(fs: traceback.FrameSummary) -> str:
        if not fs.filename or fs.filename.startswith("<"):
            return "system"
        f = str(Path(fs.filename).resolve())
        if f in user_files:
            return "user"
        return "gradlab" if f.startswith(_GRADLAB_DIR) else "system" if f.startswith(_SYSTEM_DIRS) else "other"

    frames = [(fs, kind(fs)) for fs in traceback.extract_tb(exc.__traceback__)]
    ours = [(fs, k) for fs, k in frames if k != "system"]
    if not ours or ours[-1][1] != "user":  # gradlab's, or code the command line did not name
        return None
    where = " <- ".join(f"{Path(fs.filename).name}:{fs.lineno} in {fs.name}" for fs, k in reversed(frames)
                        if k == "user")
    first = (str(exc).strip().splitlines() or [""])[0]
    return _one_line(f"your code raised {type(exc).__name__}: {first} (at {where}); fix it and rerun (--debug shows "
                     "the full traceback)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "workers", None) and not getattr(args, "scheduler", None):
        from gradlab.runner.dispatch import prestart_local_workers

        prestart_local_workers()  # the workers' imports overlap this process's own
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("gradlab: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    except (UsageError, EnvironmentProblem, OSError) as exc:  # UserCodeError is a UsageError
        if args.debug:
            raise
        problem = describe_os_error(exc) if isinstance(exc, OSError) else exc
        print(f"gradlab: error: {_one_line(problem)}", file=sys.stderr)  # a user's error names the user's frames
        return 2 if isinstance(exc, UsageError) else 1
    except Exception as exc:
        line = None if args.debug else user_code_failure(exc, _named_modules(args))
        if line is None:  # gradlab's own failure: the whole traceback, to report
            raise
        print(f"gradlab: error: {line}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
