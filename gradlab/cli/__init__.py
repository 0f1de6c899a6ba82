"""The ``gradlab`` command: a thin shell over the library.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``gradlab analyze`` never imports torch.  Bad input raises
:class:`gradlab.errors.UsageError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gradlab.errors import UsageError

# An explicit registry: subcommand -> (module, one-line help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gradlab.cli.train", "train one run or a grid, saving init/early/late checkpoints"),
    "probe": ("gradlab.cli.probe", "summed-gradient norms for every batch size into a resumable zarr store"),
    "analyze": ("gradlab.cli.analyze", "statistics, law fits with intervals, and figures from stores"),
    "sharpness": ("gradlab.cli.sharpness", "Hessian eigenvalues, trace and epsilon-sharpness of checkpoints"),
    "demo": ("gradlab.cli.demo", "the whole study on the embedded digits: train, probe, sharpness, analyze"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: exit 2 with a short hint
        self.print_usage(sys.stderr)
        self.exit(2, f"gradlab: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradlab", description="How mini-batch size shapes gradient dynamics.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UsageError as exc:
        print(f"gradlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradlab: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
