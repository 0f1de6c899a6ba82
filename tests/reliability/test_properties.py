"""Property-based tests (hypothesis): any CLI or TOML input ends in exit 0 or one error line with exit 2, never a
traceback; any sequence of write / kill / resume events on a store ends in the store of an uninterrupted run.

The CLI properties run the real parser and validation in-process; the expensive part of a valid command (the
training epochs, the probe's units) is replaced by a stub, since only what comes before it parses user input.
The store property kills real processes (SIGKILL) forked from a preloaded server (``campaign.Runner``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import store_jobs
from gradlab.cli import main
from reliability_cases import tiny_run

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None)

JUNK = st.one_of(
    st.sampled_from(["", "-1", "0", "1", "2", "nan", "inf", "-inf", "1e309", "abc", "1,,2", "2.5", "ü", " ", "0x10",
                     "{}", "[]", "null", '{"widths": -1}', '{"widths": [4]}', "1,2", "sgd,adam", "adam", "sum",
                     "/nonexistent/x", "--", "-", "=", "a=b", "é=/x"]),
    st.text(max_size=12).filter(lambda t: "\x00" not in t),
    st.integers(-5, 5000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code if isinstance(exc.code, int) else 2
    return int(rc), err.getvalue()


def assert_clean(rc: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
        assert len(lines) == 1 and lines[0].startswith("gradlab: error:"), err


def _fake_train_compute(self, state, unit, ctx):
    return {}  # no training: the runner marks the run done


TRAIN_FLAGS = ["--batch-sizes", "--lr", "--seeds", "--epochs", "--momentum", "--model-kwargs", "--data", "--model",
               "--checkpoint-epochs", "--optimizer", "--lr-scaling", "--warmup-epochs", "--decay-epochs",
               "--decay-factor", "--ghost-batch-size", "--weight-decay", "--base-batch-size", "--cyclic-factor",
               "--cyclic-half-epochs", "--checkpoint-format"]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), JUNK), max_size=4))
def test_any_train_flags_give_exit_0_or_one_line_exit_2(flags):
    argv = ["train", "--model-kwargs", '{"widths": [4]}', "--epochs", "1", "--batch-sizes", "512", "--no-progress"]
    for flag, value in flags:
        argv += [flag, value]
    with tempfile.TemporaryDirectory() as tmp, mock.patch("gradlab.train_job.TrainJob.compute", _fake_train_compute):
        assert_clean(*run_cli([*argv, "--out", str(Path(tmp) / "R")]))


# ---- TOML -----------------------------------------------------------------------------------------------------------

TOML_KEYS = ["model", "model_kwargs", "data", "batch_sizes", "lrs", "seeds", "optimizers", "momentum", "weight_decay",
             "epochs", "checkpoint_epochs", "lr_scaling", "base_batch_size", "warmup_epochs", "decay_epochs",
             "decay_factor", "cyclic", "cyclic_factor", "cyclic_sqrt_factor", "cyclic_half_epochs",
             "ghost_batch_size", "checkpoint_format", "download", "unknown_key"]
SCALARS = st.one_of(st.booleans(), st.integers(-3, 600), st.integers(), st.floats(), st.text(max_size=8),
                    st.sampled_from(["mlp", "digits", "sgd", "adam", "linear", "pt", "safetensors"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


@SETTINGS
@given(st.one_of(
    st.dictionaries(st.sampled_from(TOML_KEYS), VALUES, max_size=5).map(
        lambda d: "".join(f"{k} = {toml_value(v)}\n" for k, v in d.items())),
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
))
def test_any_toml_config_gives_exit_0_or_one_line_exit_2(text):
    with tempfile.TemporaryDirectory() as tmp, mock.patch("gradlab.train_job.TrainJob.compute", _fake_train_compute):
        cfg = Path(tmp) / "grid.toml"
        cfg.write_bytes(text.encode("utf-8", "surrogatepass"))
        # a small model and one epoch unless the file says otherwise
        argv = ["train", "--config", str(cfg), "--out", str(Path(tmp) / "R"), "--no-progress"]
        assert_clean(*run_cli(argv))


# ---- probe flags --------------------------------------------------------------------------------------------------

PROBE_FLAGS = ["--batch-sizes", "--budget", "--trials", "--lr", "--params", "--seed", "--model-kwargs",
               "--trials-per-unit", "--init", "--protocol", "--keep", "--data", "--reduction", "--dtype", "--checkpoint"]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("run"))


def test_any_probe_flags_give_exit_0_or_one_line_exit_2(probe_run):
    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(PROBE_FLAGS), JUNK), max_size=3))
    def check(flags):
        argv = ["probe", "--checkpoint", str(probe_run["late"]), "--data", "digits", "--budget", "4",
                "--batch-sizes", "1,2", "--trials", "2", "--no-progress"]
        for flag, value in flags:
            argv += [flag, value]
        with tempfile.TemporaryDirectory() as tmp, \
                mock.patch("gradlab.runner.run.local_results", lambda *a, **k: iter(())), \
                mock.patch("gradlab.probe.job.ProbeJob.finalize", lambda *a, **k: None):
            assert_clean(*run_cli([*argv, "--out", str(Path(tmp) / "p.zarr")]))

    check()


# ---- the store layer: any sequence of write / kill / resume events -------------------------------------------------

@pytest.fixture(scope="module")
def forkserver():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["store_jobs", "gradlab.store", "xarray", "zarr", "dask.array"])
    return ctx


def _run_job(ctx, path: Path, kill_at: int) -> int:
    log = str(path.parent / f".job-{kill_at}.err")
    p = ctx.Process(target=store_jobs.job_child, args=(str(path), kill_at, log))
    p.start()
    p.join(120)
    assert p.exitcode in (0, -9), Path(log).read_text()
    return p.exitcode


def test_any_write_kill_resume_sequence_ends_in_the_uninterrupted_store(forkserver, tmp_path_factory):
    from campaign import leftovers, same_store

    ref = tmp_path_factory.mktemp("ref") / "s.zarr"
    assert _run_job(forkserver, ref, -1) == 0

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(st.lists(st.integers(0, 3 * store_jobs.UNITS + 1), max_size=4))
    def check(kills):
        root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
        path = root / "s.zarr"
        for k in kills:
            _run_job(forkserver, path, k)
        assert _run_job(forkserver, path, -1) == 0
        assert same_store(path, ref) == ""
        assert leftovers(root) == ""

    check()
