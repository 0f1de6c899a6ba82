"""Crash and hostile-input campaign: kill gradlab commands at random moments, resume, compare bitwise.

Every kill sequence runs one command (train, probe with either protocol, sharpness, analyze) into a fresh output,
SIGKILLs it -- at a named crash point (``GRADLAB_CRASH_AT``: store creation, a checkpoint write, a unit marked
done, the probe's finalize, the analysis write, the store's last step) or after a random delay -- then reruns it
with ``--resume`` (analyze: the same command) until it finishes, and compares the result with an uninterrupted
run of the same command: every array of every group bitwise (NaN = NaN), every attr but the provenance, every
checkpoint tensor, the analysis summary, and that no staging folder is left.  The hostile-input battery runs
the CLI on bad flags, files and configs and checks each ends with exit 0, or one ``gradlab: error:`` line and
exit 1 or 2 -- never a traceback.

Commands run in processes forked from a server that has imported gradlab, torch, xarray and zarr (saving the
interpreter start-up of every run); each is a whole ``gradlab`` process as far as the kill is concerned.

    python -m tests.reliability.campaign --kills 200     # the long campaign: prints a table
    python -m tests.reliability.campaign --kills 20      # about the CI sample

The CI sample is tests/reliability/test_campaign.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

PRELOAD = ["gradlab.cli", "gradlab.cli.train", "gradlab.cli.probe", "gradlab.cli.sharpness", "gradlab.cli.analyze",
           "gradlab.train", "gradlab.probe.run", "gradlab.curvature.run", "gradlab.analysis.run", "torch", "xarray",
           "zarr", "scipy.stats", "scipy.sparse.linalg", "dask.array", "tomllib"]


# ------------------------------------------------------------------------------------------------ running commands


@dataclass
class Result:
    rc: int | None
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.rc == -9

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    cwd = Path(log).parent / "cwd"  # relative --out values land in the campaign's folder, not the checkout
    cwd.mkdir(exist_ok=True)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    from gradlab.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - what the CLI would have shown as a traceback
        traceback.print_exc()
        rc = 1
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(int(rc or 0))


class Runner:
    """Runs ``gradlab ARGV`` in processes forked from a preloaded server; kills them on request."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.n = 0

    def start(self, argv: list[str], *, crash: str | None = None, signal: str = "SIGKILL"
              ) -> tuple[object, str, float]:
        """Start ``gradlab ARGV`` (not waiting); ``finish`` it later."""
        self.n += 1
        log = str(self.workdir / f".run{self.n}.err")
        env = {"GRADLAB_CRASH_AT": crash or "", "GRADLAB_CRASH_SIGNAL": signal}
        p = self.ctx.Process(target=_child, args=(list(argv), env, log))
        start = time.perf_counter()
        p.start()
        return p, log, start

    def finish(self, handle: tuple[object, str, float], *, kill_after: float | None = None,
               timeout: float = 600) -> Result:
        """Wait for a started command (SIGKILL it after ``kill_after`` seconds from its start, if given)."""
        p, log, start = handle
        wait = (kill_after if kill_after is not None else timeout) - (time.perf_counter() - start)
        p.join(max(wait, 0.0))  # type: ignore[attr-defined]
        if p.is_alive():  # type: ignore[attr-defined]
            p.kill()  # type: ignore[attr-defined]
            p.join()  # type: ignore[attr-defined]
        seconds = time.perf_counter() - start
        err = Path(log).read_text(errors="replace") if Path(log).exists() else ""
        return Result(p.exitcode, err, seconds)  # type: ignore[attr-defined]

    def run(self, argv: list[str], *, crash: str | None = None, kill_after: float | None = None,
            timeout: float = 600) -> Result:
        return self.finish(self.start(argv, crash=crash), kill_after=kill_after, timeout=timeout)


# ---------------------------------------------------------------------------------------------- comparing outputs


def _arrays(path: Path) -> dict[str, tuple[np.ndarray, dict]]:
    import zarr

    out: dict[str, tuple[np.ndarray, dict]] = {}

    def walk(group, prefix: str) -> None:
        out[prefix + "/@attrs"] = (np.array(0), {k: v for k, v in group.attrs.items() if k != "provenance"})
        for name, arr in group.arrays():
            out[prefix + "/" + name] = (np.asarray(arr[...]), dict(arr.attrs))
        for name, sub in group.groups():
            walk(sub, prefix + "/" + name)

    walk(zarr.open_group(str(path), mode="r", use_consolidated=False), "")
    return out


def same_store(a: Path, b: Path) -> str:
    """'' if the two stores hold the same groups, arrays (bitwise, NaN = NaN) and attrs; else what differs."""
    va, vb = _arrays(a), _arrays(b)
    if sorted(va) != sorted(vb):
        return f"members differ: {sorted(set(va) ^ set(vb))}"
    for name in va:
        (x, ax), (y, ay) = va[name], vb[name]
        if json.dumps(ax, sort_keys=True, default=str) != json.dumps(ay, sort_keys=True, default=str):
            return f"{name}: attrs differ"
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: dtype/shape differ"
        eq = np.array_equal(x, y, equal_nan=True) if x.dtype.kind in "fc" else np.array_equal(x, y)
        if x.dtype.kind in "fc" and eq:  # bitwise, not just ==: -0.0 vs 0.0 and NaN payloads count
            eq = x.tobytes() == y.tobytes()
        if not eq:
            return f"{name}: values differ"
    return ""


def same_checkpoints(a: Path, b: Path) -> str:
    import torch

    fa = sorted(p.relative_to(a) for p in a.rglob("*.pt"))
    fb = sorted(p.relative_to(b) for p in b.rglob("*.pt"))
    if fa != fb:
        return f"checkpoint files differ: {sorted(set(fa) ^ set(fb))}"
    for rel in fa:
        x, y = (torch.load(root / rel, weights_only=True) for root in (a, b))
        for k in x["state_dict"]:
            if not torch.equal(x["state_dict"][k], y["state_dict"][k]):
                return f"{rel}: tensor {k} differs"
        # git_revision is left out: a commit between the reference and the resumed run changes it legitimately
        ma, mb = ({k: v for k, v in m["meta"].items() if k != "git_revision"} for m in (x, y))
        if x["recipe"] != y["recipe"] or ma != mb:
            return f"{rel}: recipe or meta differ"
    return ""


def leftovers(folder: Path) -> str:
    found = [str(p) for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".tmp")]
    return f"staging left: {found}" if found else ""


# ----------------------------------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    argv: Callable[[Path], list[str]]  # the command for an output root
    resume: list[str]  # extra args of the rerun
    points: list[str]  # crash points this command passes
    compare: Callable[[Path, Path], str]  # (output root, reference root) -> '' or what differs
    prepare: Callable[[Path], None] = lambda root: root.mkdir(parents=True)


def scenarios(inputs: Path, ref_probe: Path | None = None) -> dict[str, Scenario]:
    from reliability_cases import TRAIN_ARGS

    ck = {k: str(inputs / "run" / f"{k}.pt") for k in ("early", "late")}

    def probe(protocol: str) -> Callable[[Path], list[str]]:
        return lambda root: ["probe", "--checkpoint", ck["early"], "--checkpoint", ck["late"], "--data", "digits",
                             "--batch-sizes", "1,2,4,8", "--budget", "8", "--trials", "6", "--trials-per-unit", "2",
                             "--protocol", protocol, "--keep", "vectors", "--no-progress", "--out",
                             str(root / "p.zarr")]

    def store_cmp(name: str) -> Callable[[Path, Path], str]:
        return lambda root, ref: same_store(root / name, ref / name) or leftovers(root)

    def analyze_prepare(root: Path) -> None:
        root.mkdir(parents=True)
        assert ref_probe is not None
        shutil.copytree(ref_probe, root / "p.zarr")

    def analyze_cmp(root: Path, ref: Path) -> str:
        diff = same_store(root / "p.zarr", ref / "p.zarr") or leftovers(root)
        if diff:
            return diff
        sa, sb = ((r / "report" / "summary.json").read_text().replace(str(r), "ROOT") for r in (root, ref))
        return "" if sa == sb else "summary.json differs"

    return {
        "train": Scenario("train", lambda root: [*TRAIN_ARGS, "--out", str(root / "R")], ["--resume"],
                          ["store.create", "checkpoint.write:1", "checkpoint.write:4", "store.done:1", "store.finish"],
                          lambda root, ref: (same_store(root / "R" / "train.zarr", ref / "R" / "train.zarr")
                                             or same_checkpoints(root / "R", ref / "R") or leftovers(root))),
        "probe-frozen": Scenario("probe-frozen", probe("frozen"), ["--resume"],
                                 ["store.create", "store.done:1", "store.done:4", "probe.finalize", "store.finish"],
                                 store_cmp("p.zarr")),
        "probe-step": Scenario("probe-step", probe("step"), ["--resume"],
                               ["store.create", "store.done:2", "store.done:5", "probe.finalize", "store.finish"],
                               store_cmp("p.zarr")),
        "sharpness": Scenario(
            "sharpness",
            lambda root: ["sharpness", "--checkpoint", ck["early"], "--checkpoint", ck["late"], "--samples", "64",
                          "--top-k", "2", "--hutchinson-probes", "4", "--eps", "1e-3", "--lbfgs-iters", "2",
                          "--no-progress", "--out", str(root / "s.zarr")],
            ["--resume"], ["store.create", "store.done:1", "store.done:2", "store.finish"], store_cmp("s.zarr")),
        "analyze": Scenario(
            "analyze",
            lambda root: ["analyze", str(root / "p.zarr"), "--out", str(root / "report"), "--n-boot", "19",
                          "--no-figures"],
            [], ["analysis.write:1", "analysis.write:2", "analysis.finish"], analyze_cmp, analyze_prepare),
    }


# -------------------------------------------------------------------------------------------------------- hostile


def hostile_inputs(inputs: Path, rng: np.random.Generator, n_random: int) -> list[list[str]]:
    """Bad flags, files and configs, as a new user would type them: a fixed list plus random mutations."""
    ck = str(inputs / "run" / "late.pt")
    folder = inputs / "a_folder"
    folder.mkdir(exist_ok=True)
    textfile = inputs / "notes.txt"
    textfile.write_text("not a checkpoint\n")
    garbage = inputs / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    tomls = {
        "str_epochs": 'epochs = "one"', "float_epochs": "epochs = 1.5", "neg_epochs": "epochs = -3",
        "nan_lr": "lrs = [nan]", "inf_momentum": "momentum = inf", "bad_key": "epoch = 3", "not_toml": "epochs == 3",
        "list_of_tables": "[[batch_sizes]]\nx = 1", "huge_int": "epochs = 99999999999999999",
        "kwargs_str": 'model_kwargs = "x"', "opt_unknown": 'optimizers = ["rmsprop"]', "empty_grid": "lrs = []",
        "bool_bs": "batch_sizes = [true]", "nested": "model_kwargs = {widths = [\"a\"]}",
        "binary": "\udcff\udcfe", "seed_neg": "seeds = [-1]",
    }
    cfgs = {}
    for k, text in tomls.items():
        p = inputs / f"{k}.toml"
        p.write_bytes(text.encode("utf-8", "surrogateescape"))
        cfgs[k] = str(p)
    out = str(inputs / "hostile-out")
    fixed = [
        *[["train", "--config", c, "--out", out, "--no-progress"] for c in cfgs.values()],
        ["train", "--config", str(folder), "--out", out], ["train", "--config", "/nonexistent.toml", "--out", out],
        ["train", "--model-kwargs", '{"widths": "abc"}', "--out", out], ["train", "--model-kwargs", "[1]", "--out", out],
        ["train", "--model-kwargs", "{bad json", "--out", out], ["train", "--model", "os:system", "--out", out],
        ["train", "--model", "nosuchmodule_xyz:f", "--out", out], ["train", "--model", "os:nosuch", "--out", out],
        ["train", "--model", "os:sep", "--out", out], ["train", "--data", "nosuch", "--out", out],
        ["train", "--batch-sizes", "0", "--out", out], ["train", "--batch-sizes", "1,,x", "--out", out],
        ["train", "--lr", "nan", "--out", out], ["train", "--lr", "-1", "--out", out],
        ["train", "--epochs", "0", "--out", out], ["train", "--momentum", "nan", "--out", out],
        ["train", "--out", str(textfile)], ["train", "--out", str(inputs)],
        ["train", "--checkpoint-epochs", "99", "--epochs", "2", "--out", out],
        ["probe", "--checkpoint", str(folder), "--data", "digits", "--out", out],
        ["probe", "--checkpoint", str(textfile), "--data", "digits", "--out", out],
        ["probe", "--checkpoint", str(garbage), "--data", "digits", "--out", out],
        ["probe", "--checkpoint", "/nonexistent.pt", "--data", "digits", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--budget", "0", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--batch-sizes", "3", "--budget", "8", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--params", "([", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--params", "^nomatch$", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--budget", "100000", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--lr", "inf", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--model-kwargs", '{"widths": [3]}', "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--workers", "0", "--out", out],
        ["probe", "--checkpoint", ck, "--data", "digits", "--out", str(textfile), "--resume"],
        ["probe", "--checkpoint", ck, "--data", "digits", "--out", str(inputs / "run"), "--resume"],
        ["sharpness", "--checkpoint", ck, "--samples", "0", "--out", out],
        ["sharpness", "--checkpoint", ck, "--samples", "99999", "--out", out],
        ["sharpness", "--checkpoint", ck, "--eps", "x", "--out", out],
        ["sharpness", "--checkpoint", ck, "--top-k", "100000", "--out", out],
        ["sharpness", "--checkpoint", ck, "--into", str(textfile)],
        ["sharpness", "--checkpoint", str(folder), "--out", out],
        ["analyze", str(textfile)], ["analyze", str(folder)], ["analyze", "/nonexistent.zarr"],
        ["analyze", str(inputs / "run")], ["analyze", str(inputs), "--n-boot", "-1"],
        ["nosuchcommand"], [], ["probe"], ["train", "--epochs", "x"],
    ]
    junk = ["", "-1", "0", "nan", "inf", "-inf", "1e309", "abc", "1,,2", "2.5", "ü", "   ", "0x10", "x" * 3000,
            "{}", "[]", "null", '{"widths": -1}', "/proc/gradlab-no-such-dir/x", str(folder), str(textfile),
            os.devnull]
    flags = {"train": ["--batch-sizes", "--lr", "--seeds", "--epochs", "--momentum", "--model-kwargs", "--data",
                       "--model", "--checkpoint-epochs", "--optimizer", "--lr-scaling", "--warmup-epochs",
                       "--decay-epochs", "--decay-factor", "--ghost-batch-size", "--weight-decay", "--base-batch-size"],
             "probe": ["--batch-sizes", "--budget", "--trials", "--lr", "--params", "--seed", "--model-kwargs",
                       "--trials-per-unit", "--init", "--protocol", "--keep", "--data"],
             "sharpness": ["--samples", "--top-k", "--hutchinson-probes", "--eps", "--subspace-dim",
                           "--minibatch-sizes", "--chunk-size", "--lanczos-tol", "--alpha-points", "--data"],
             "analyze": ["--ref-batch-size", "--n-boot", "--seed", "--out"]}
    base = {"train": ["train", "--model-kwargs", '{"widths": [8]}', "--epochs", "1", "--batch-sizes", "512",
                      "--no-progress"],
            "probe": ["probe", "--checkpoint", ck, "--data", "digits", "--budget", "4", "--batch-sizes", "1,2",
                      "--trials", "2", "--no-progress"],
            "sharpness": ["sharpness", "--checkpoint", ck, "--samples", "16", "--top-k", "1", "--hutchinson-probes",
                          "2", "--eps", "1e-3", "--lbfgs-iters", "1", "--no-progress"],
            "analyze": ["analyze", str(inputs / "ref-probe" / "p.zarr"), "--n-boot", "0", "--no-figures"]}
    rand = []
    for i in range(n_random):
        cmd = str(rng.choice(list(flags)))
        argv = list(base[cmd])
        for flag in rng.choice(flags[cmd], size=int(rng.integers(1, 3)), replace=False):
            argv += [str(flag), str(rng.choice(junk))]
        o = str(inputs / f"hostile-rand-{i}")
        argv += (["--out", o + ".zarr"] if cmd in ("probe", "sharpness") else
                 ["--out", o] if cmd == "train" else [] if "--out" in argv else ["--out", o])
        rand.append(argv)
    return fixed + rand


def one_line_error(res: Result) -> bool:
    """Exit 0, or exit 1/2 with exactly one 'gradlab: error:' line (argparse's usage block aside)."""
    if res.rc == 0:
        return not res.traceback
    if res.rc not in (1, 2) or res.traceback:
        return False
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("usage:", " ", "WARNING"))]
    errors = [ln for ln in lines if ln.startswith("gradlab: error:")]
    return len(errors) == 1 and lines == errors


# ------------------------------------------------------------------------------------------------------- campaign


@dataclass
class Row:
    kills: int = 0
    resumes: int = 0
    sequences: int = 0
    identical: int = 0
    finished_before_kill: int = 0
    tracebacks: int = 0
    failures: list[str] = field(default_factory=list)


def make_inputs(root: Path) -> None:
    from reliability_cases import tiny_run

    tiny_run(root / "run")


def campaign(kills: int, *, seed: int = 0, workdir: Path | None = None, hostile: int | None = None,
             second_kill: float = 0.25, verbose: bool = True) -> dict[str, object]:
    """Run about ``kills`` kill sequences spread over the commands (half at crash points, half after random
    delays) plus the hostile-input battery; returns the per-command table and the totals."""
    os.environ["OMP_NUM_THREADS"] = "1"  # the forkserver (and so every command) runs torch with one thread
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="gradlab-campaign-")) if own else Path(workdir)
    rng = np.random.default_rng(seed)
    runner = Runner(work)
    try:
        inputs = work / "inputs"
        make_inputs(inputs)
        pre = scenarios(inputs)
        refs: dict[str, tuple[Path, float]] = {}
        for name in ("probe-frozen", "probe-step", "train", "sharpness"):
            root = work / f"ref-{name}"
            pre[name].prepare(root)
            r = runner.run(pre[name].argv(root))
            assert r.rc == 0, (name, r.stderr)
            refs[name] = (root, r.seconds)
        ref_probe = refs["probe-frozen"][0] / "p.zarr"
        shutil.copytree(refs["probe-frozen"][0], inputs / "ref-probe")
        scen = scenarios(inputs, ref_probe)
        root = work / "ref-analyze"
        scen["analyze"].prepare(root)
        r = runner.run(scen["analyze"].argv(root))
        assert r.rc == 0, r.stderr
        refs["analyze"] = (root, r.seconds)

        n_random = hostile if hostile is not None else max(10, kills)
        cases = hostile_inputs(inputs, rng, n_random) if n_random >= 0 else []
        bad_inputs: list[str] = []
        hostile_tracebacks = 0
        for argv in cases:
            res = runner.run(argv, timeout=120)
            hostile_tracebacks += res.traceback
            if verbose and res.seconds > 3:
                print(f"  hostile input took {res.seconds:.1f} s: {argv}", file=sys.stderr, flush=True)
            if not one_line_error(res):
                bad_inputs.append(f"{argv}: exit {res.rc}: {res.stderr[-400:]}")
        if verbose:
            print(f"  hostile inputs: {len(cases)} tried, {len(bad_inputs)} not clean, {hostile_tracebacks} "
                  "tracebacks", file=sys.stderr, flush=True)
        table = {name: Row() for name in scen}
        names = list(scen)
        for i in range(kills):
            name = names[i % len(names)]
            sc, row = scen[name], table[name]
            ref_root, ref_seconds = refs[name]
            root = work / f"{name}-{i}"
            sc.prepare(root)
            at_point = i // len(names) % 2 == 0
            crash = sc.points[int(rng.integers(len(sc.points)))] if at_point else None
            delay = None if at_point else float(rng.uniform(0.05, 1.0) * ref_seconds)
            res = runner.run(sc.argv(root), crash=crash, kill_after=delay)
            row.sequences += 1
            row.tracebacks += res.traceback
            if not res.killed:
                if res.rc == 0:
                    row.finished_before_kill += 1
                else:
                    row.failures.append(f"{name}-{i}: first run exit {res.rc}: {res.stderr[-300:]}")
                    continue
            else:
                row.kills += 1
                for attempt in range(5):  # resume until it finishes; sometimes kill the resume too
                    delay2 = (float(rng.uniform(0.05, 1.0) * ref_seconds)
                              if attempt == 0 and rng.random() < second_kill else None)
                    res = runner.run(sc.argv(root) + sc.resume, kill_after=delay2)
                    row.resumes += 1
                    row.tracebacks += res.traceback
                    if res.killed:
                        row.kills += 1
                        continue
                    break
                if res.rc != 0:
                    row.failures.append(f"{name}-{i}: resume exit {res.rc}: {res.stderr[-300:]}")
                    continue
            diff = sc.compare(root, ref_root)
            if diff:
                row.failures.append(f"{name}-{i} (crash={crash}, delay={delay}): {diff}")
            else:
                row.identical += 1
            if verbose:
                print(f"  {name}-{i}: crash={crash or '-'} delay={'-' if delay is None else f'{delay:.2f}s'} "
                      f"-> {'identical' if not diff else diff}", file=sys.stderr, flush=True)
            shutil.rmtree(root, ignore_errors=True)

        totals = {
            "kills": sum(r.kills for r in table.values()),
            "resumes": sum(r.resumes for r in table.values()),
            "sequences": sum(r.sequences for r in table.values()),
            "identical_stores": sum(r.identical for r in table.values()),
            "finished_before_kill": sum(r.finished_before_kill for r in table.values()),
            "hostile_inputs": len(cases),
            "hostile_bad": len(bad_inputs),
            "tracebacks": sum(r.tracebacks for r in table.values()) + hostile_tracebacks,
        }
        return {"table": table, "totals": totals, "bad_inputs": bad_inputs,
                "failures": [f for r in table.values() for f in r.failures]}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def format_table(report: dict[str, object]) -> str:
    table: dict[str, Row] = report["table"]  # type: ignore[assignment]
    head = f"{'command':<14}{'sequences':>10}{'kills':>7}{'resumes':>9}{'identical':>11}{'no-kill':>9}{'tracebacks':>12}"
    lines = [head, "-" * len(head)]
    for name, r in table.items():
        lines.append(f"{name:<14}{r.sequences:>10}{r.kills:>7}{r.resumes:>9}{r.identical:>11}"
                     f"{r.finished_before_kill:>9}{r.tracebacks:>12}")
    t = report["totals"]  # type: ignore[index]
    lines.append("-" * len(head))
    lines.append(f"{'total':<14}{t['sequences']:>10}{t['kills']:>7}{t['resumes']:>9}{t['identical_stores']:>11}"
                 f"{t['finished_before_kill']:>9}{t['tracebacks']:>12}")
    lines.append(f"hostile inputs tried: {t['hostile_inputs']}, not ending in exit 0 or one error line: "
                 f"{t['hostile_bad']}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.campaign", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="kill sequences to run (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hostile", type=int, default=None,
                        help="random hostile inputs besides the fixed list (default: --kills; -1: no hostile inputs)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = campaign(args.kills, seed=args.seed, hostile=args.hostile, verbose=not args.quiet)
    print(format_table(report))
    for f in report["failures"] + report["bad_inputs"]:  # type: ignore[operator]
        print("FAIL", f)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    ok = not report["failures"] and not report["bad_inputs"] and report["totals"]["tracebacks"] == 0  # type: ignore
    return 0 if ok else 1


if __name__ == "__main__":
    from tests.reliability import campaign as _module  # functions pickled by their importable name

    sys.exit(_module.cli())
