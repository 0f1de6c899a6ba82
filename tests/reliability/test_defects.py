"""Regression tests for the defects of issue 16, one (or a few) per numbered defect, each named after it.

Each failed on the code before the fix (run against the main checkout to see it) and passes after.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlab.cli import main
from reliability_cases import TRAIN_ARGS, one_error_line, probe_argv, tiny_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "probe"))
from probe_cases import assert_same_values  # noqa: E402


# ---- defect 1: train cannot resume after a kill during store creation ------------------------------------------


def test_defect_1_train_resumes_after_a_kill_during_store_creation(tmp_path, capsys):
    out = tmp_path / "R"
    out.mkdir()
    # what kill -9 during create_store leaves: the lock file and a half-written staging folder
    (out / ".train.zarr.lock").touch()
    stale = out / ".train.zarr.tmp-abc123" / "store.zarr"
    stale.mkdir(parents=True)
    (stale / "zarr.json").write_text("{")
    assert main([*TRAIN_ARGS, "--out", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert not list(out.glob(".train.zarr.tmp-*"))  # and the leftover is gone (defect 9)
    ref = tmp_path / "ref"
    assert main([*TRAIN_ARGS, "--out", str(ref)]) == 0
    from gradlab.store import open_store

    a, b = open_store(out / "train.zarr").load(), open_store(ref / "train.zarr").load()
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values)


# ---- defect 2: a failed first run leaves an empty store that blocks the corrected rerun --------------------------


def test_defect_2_failed_first_probe_leaves_no_store(tmp_path, monkeypatch, capsys):
    import gradlab.probe.job as pr

    paths = tiny_run(tmp_path / "run")
    out = tmp_path / "p.zarr"

    def boom(*a, **k):
        raise RuntimeError("simulated failure before any unit finished")

    monkeypatch.setattr(pr, "compute_trials", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        main(probe_argv(paths, out))
    assert not out.exists()
    monkeypatch.undo()
    assert main(probe_argv(paths, out)) == 0  # the corrected rerun, without --resume
    assert main(probe_argv(paths, tmp_path / "q.zarr", "--resume")) == 0  # and with --resume on a new path


def test_defect_2_failed_first_train_leaves_no_store(tmp_path, monkeypatch, capsys):
    import gradlab.train_loop as tr

    out = tmp_path / "R"

    def boom(*a, **k):
        raise RuntimeError("simulated failure in the first run")

    monkeypatch.setattr(tr, "train_run", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        main([*TRAIN_ARGS, "--out", str(out)])
    assert not (out / "train.zarr").exists() and not (out / "runs").exists()
    monkeypatch.undo()
    assert main([*TRAIN_ARGS, "--out", str(out)]) == 0, capsys.readouterr().err


def test_defect_2_kept_when_a_unit_was_done(tmp_path, monkeypatch):
    """The removal is only for stores with nothing done: finished units are never thrown away."""
    import gradlab.probe.job as pr

    paths = tiny_run(tmp_path / "run")
    out = tmp_path / "p.zarr"
    real, calls = pr.compute_trials, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated")
        return real(*a, **k)

    monkeypatch.setattr(pr, "compute_trials", second_fails)
    with pytest.raises(RuntimeError):
        main(probe_argv(paths, out))
    assert (out / "zarr.json").exists()


# ---- defect 3: analyze --out overwrites a user's own summary.json ------------------------------------------------


def test_defect_3_analyze_refuses_an_out_folder_holding_other_data(tmp_path, capsys):
    from gradlab.synthetic import write_synthetic_store

    store = tmp_path / "s.zarr"
    write_synthetic_store(store, trials=4, batch_sizes=(1, 2, 4), budget=4, pool_size=64)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "own data"}')
    assert main(["analyze", str(store), "--out", str(mine), "--n-boot", "0", "--no-figures"]) == 2
    assert "holds other data" in one_error_line(capsys.readouterr().err)
    assert (mine / "summary.json").read_text() == '{"my": "own data"}'
    assert not (store / "analysis").exists()
    # a new folder, and rerunning into gradlab's own output, both work
    assert main(["analyze", str(store), "--out", str(tmp_path / "a"), "--n-boot", "0", "--no-figures"]) == 0
    assert main(["analyze", str(store), "--out", str(tmp_path / "a"), "--n-boot", "0", "--no-figures"]) == 0


# ---- defect 4: two probes on one new --out: the second dies with a traceback --------------------------------------


def test_defect_4_second_probe_on_a_new_out_is_refused_with_one_line(tmp_path, capsys):
    from gradlab.store import acquire_lock, release_lock

    paths = tiny_run(tmp_path / "run")
    out = tmp_path / "p.zarr"
    fd = acquire_lock(out)  # the first probe holds the lock while it creates the store
    try:
        assert main(probe_argv(paths, out)) == 2
    finally:
        release_lock(fd)
    assert "being written by another gradlab process" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert main(probe_argv(paths, out)) == 0


# ---- defect 5: tracebacks and exit 1 instead of one line and exit 2 -----------------------------------------------


@pytest.mark.parametrize(("toml", "expect"), [('epochs = "one"', "epochs must be an integer"),
                                               ("epochs = 1.5", "epochs must be an integer"),
                                               ("batch_sizes = [32, \"x\"]", "batch_sizes must be a list"),
                                               ("lrs = 0.1\nmomentum = true", "momentum must be a number"),
                                               ("model_kwargs = 3", "model_kwargs must be a table")])
def test_defect_5_toml_value_of_the_wrong_type(tmp_path, capsys, toml, expect):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(toml + "\n")
    out = tmp_path / "R"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert expect in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(("args", "expect"), [
    (["--model-kwargs", '{"widths": "abc"}'], "bad keyword arguments"),
    (["--model", "os:system"], "your model factory 'os:system' raised TypeError"),
])
def test_defect_5_bad_model_flags(tmp_path, capsys, args, expect):
    out = tmp_path / "R"
    assert main(["train", *args, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expect in line and "raised UserCodeError" not in line  # said once, not wrapped twice
    assert not out.exists()


def test_a_raising_factory_is_named_once_without_blaming_model_kwargs(tmp_path, capsys, monkeypatch):
    (tmp_path / "badfac.py").write_text("def make():\n    raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "R"
    assert main(["train", "--model", "badfac:make", "--data", "digits", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "RuntimeError: no GPU here" in line and line.count("raised") == 1 and "--model-kwargs" not in line


def test_analyze_of_a_path_that_does_not_exist(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nothing.zarr")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)


def test_defect_5_train_out_is_an_existing_file(tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("mine")
    assert main([*TRAIN_ARGS, "--out", str(f)]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert f.read_text() == "mine"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_defect_5_environment_errors_are_one_line_exit_1(tmp_path, capsys, monkeypatch, code):
    """An --out on a read-only filesystem, in a folder the user cannot write, or on a full disk: the OS error
    surfaces from zarr's first write (simulated here: the test runs as root, where chmod does not refuse)."""
    import gradlab.store as st

    paths = tiny_run(tmp_path / "run")

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code), str(tmp_path / "p.zarr"))

    monkeypatch.setattr(st, "staging_for", refuse)
    assert main(probe_argv(paths, tmp_path / "p.zarr")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert os.strerror(code) in line and "p.zarr" in line


def test_defect_5_full_disk_while_train_saves_a_checkpoint(tmp_path, capsys, monkeypatch):
    """torch.save on a full disk raises an opaque 'enforce fail at inline_container.cc ... unexpected pos'."""
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456")

    monkeypatch.setattr(torch, "save", full)
    assert main([*TRAIN_ARGS, "--out", str(tmp_path / "R")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "could not write checkpoint" in line and "free some space" in line
    assert not list((tmp_path / "R").rglob("*.tmp"))


def test_defect_5_data_factory_that_raises_shows_the_users_frames_only(tmp_path, capsys, monkeypatch):
    (tmp_path / "userdata.py").write_text(textwrap.dedent("""
        def helper():
            raise ValueError("my data is broken")

        def make():
            return helper()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--data", "userdata:make", "--epochs", "1", "--out", str(tmp_path / "R"),
                 "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("gradlab: error: your data factory 'userdata:make' raised ValueError: my data is broken")
    assert "(at userdata.py:3 in helper <- userdata.py:6 in make)" in line  # the user's frames only
    assert "gradlab" + os.sep not in line and "site-packages" not in line and ".py:" in line


def test_defect_5_debug_shows_the_full_traceback(tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text('epochs = "one"\n')
    from gradlab.errors import UsageError

    with pytest.raises(UsageError, match="epochs must be an integer"):
        main(["train", "--config", str(cfg), "--out", str(tmp_path / "R"), "--debug"])


# ---- defect 6: probe accepts checkpoints with NaN or Inf weights -------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_defect_6_probe_and_sharpness_refuse_nonfinite_checkpoint_weights(tmp_path, capsys, bad):
    from gradlab.checkpoint import load_checkpoint, save_checkpoint

    paths = tiny_run(tmp_path / "run")
    ck = load_checkpoint(paths["late"])
    from gradlab.checkpoint import build_model_from

    net = build_model_from(ck)
    with torch.no_grad():
        next(net.parameters())[0, 0] = bad
    save_checkpoint(paths["late"], net, ck.recipe, ck.meta)
    out = tmp_path / "p.zarr"
    assert main(probe_argv(paths, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "NaN or Inf weights in layers.0.weight" in line and not out.exists()
    assert main(["sharpness", "--checkpoint", str(paths["late"]), "--samples", "32", "--out",
                 str(tmp_path / "s.zarr"), "--no-progress"]) == 2
    assert "NaN or Inf weights in layers.0.weight" in one_error_line(capsys.readouterr().err)


# ---- defect 7: checkpoints written 0600 whatever the umask; permission denied hidden ---------------------------


def test_defect_7_checkpoints_follow_the_umask(tmp_path):
    from gradlab.checkpoint import Recipe, save_checkpoint
    from gradlab.models import build_model

    net = build_model("mlp", (1, 8, 8), 10, widths=[4])
    old = os.umask(0o022)
    try:
        p = save_checkpoint(tmp_path / "a.pt", net, Recipe("mlp", {"widths": [4]}, (1, 8, 8), 10), {})
        q = save_checkpoint(tmp_path / "a.safetensors", net, Recipe("mlp", {"widths": [4]}, (1, 8, 8), 10), {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644 and stat.S_IMODE(q.stat().st_mode) == 0o644


def test_defect_7_unreadable_checkpoint_says_permission_denied(tmp_path, capsys, monkeypatch):
    import builtins

    paths = tiny_run(tmp_path / "run")
    real_open, target = builtins.open, str(paths["late"])

    def guarded(file, *a, **k):  # another user's 0600 file (the test runs as root, which chmod does not stop)
        if str(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    assert main(probe_argv(paths, tmp_path / "p.zarr")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "Permission denied" in line and "late.pt" in line and "not a readable torch checkpoint" not in line


# ---- defect 8: analyze never reads schema_version -----------------------------------------------------------------


def test_defect_8_store_from_a_newer_gradlab_is_refused(tmp_path, capsys):
    import zarr

    from gradlab.synthetic import write_synthetic_store

    store = tmp_path / "s.zarr"
    write_synthetic_store(store, trials=4, batch_sizes=(1, 2, 4), budget=4, pool_size=64)
    zarr.open_group(store, mode="r+", use_consolidated=False).attrs["schema_version"] = 99
    out = tmp_path / "a"
    assert main(["analyze", str(store), "--out", str(out), "--n-boot", "0", "--no-figures"]) == 2
    assert "written by a newer gradlab" in one_error_line(capsys.readouterr().err)
    assert not (store / "analysis").exists() and not (out / "summary.json").exists()
    from gradlab.errors import StoreError
    from gradlab.store import StoreWriter

    with pytest.raises(StoreError, match="newer gradlab"):
        StoreWriter(store)


# ---- defect 9: temporary folders are never cleaned ---------------------------------------------------------------


def test_defect_9_stale_staging_folders_go_on_resume_and_analyze(tmp_path, capsys):
    from gradlab.synthetic import write_synthetic_store

    paths = tiny_run(tmp_path / "run")
    out = tmp_path / "p.zarr"
    assert main(probe_argv(paths, out)) == 0
    stale = tmp_path / ".p.zarr.tmp-dead0001"
    (stale / "store.zarr").mkdir(parents=True)
    other = tmp_path / ".other.zarr.tmp-keep"  # another store's: never touched
    other.mkdir()
    assert main(probe_argv(paths, out, "--resume")) == 0
    assert not stale.exists() and other.exists()

    store = tmp_path / "s.zarr"
    write_synthetic_store(store, trials=4, batch_sizes=(1, 2, 4), budget=4, pool_size=64)
    inside = store / ".analysis.tmp-dead0002"  # what a killed analyze of an older gradlab left in the hierarchy
    inside.mkdir()
    beside = tmp_path / ".s.zarr.analysis.tmp-dead0003"
    beside.mkdir()
    assert main(["analyze", str(store), "--out", str(tmp_path / "a"), "--n-boot", "0", "--no-figures"]) == 0
    assert not inside.exists() and not beside.exists()
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []


def test_defect_9_analysis_is_staged_beside_the_store(tmp_path, monkeypatch):
    import gradlab.analysis.run as ar
    from gradlab.synthetic import write_synthetic_store

    store = tmp_path / "s.zarr"
    write_synthetic_store(store, trials=4, batch_sizes=(1, 2, 4), budget=4, pool_size=64)
    seen = []
    import gradlab.store as st

    real_staging = st.staging_for

    def spy(path):
        tmp = real_staging(path)
        seen.append(tmp)
        return tmp

    monkeypatch.setattr(st, "staging_for", spy)
    ar.analyze_store(store, out_dir=tmp_path / "a", n_boot=0, figures=False)
    assert seen and all(p.parent == tmp_path for p in seen)


# ---- defect 10: smaller ones ----------------------------------------------------------------------------------------


def test_defect_10_checkpoint_path_that_is_a_folder(tmp_path, capsys):
    paths = tiny_run(tmp_path / "run")
    folder = tmp_path / "ckpt_folder"
    folder.mkdir()
    argv = probe_argv(paths, tmp_path / "p.zarr")
    argv[argv.index(str(paths["late"]))] = str(folder)
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is a folder" in line and "does not exist" not in line


def test_defect_10_resume_on_a_foreign_zarr_store(tmp_path, capsys):
    import xarray as xr

    paths = tiny_run(tmp_path / "run")
    out = tmp_path / "p.zarr"
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(out, zarr_format=3, consolidated=False)
    assert main(probe_argv(paths, out, "--resume")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "gradlab did not write" in line and "stored config: None" not in line


def test_defect_10_plain_open_zarr_is_quiet_on_every_finished_store(tmp_path):
    import xarray as xr

    from gradlab.synthetic import write_synthetic_store

    paths = tiny_run(tmp_path / "run")
    assert main(probe_argv(paths, tmp_path / "p.zarr")) == 0
    assert main([*TRAIN_ARGS, "--out", str(tmp_path / "R")]) == 0
    assert main(["sharpness", "--checkpoint", str(paths["late"]), "--samples", "32", "--top-k", "1",
                 "--hutchinson-probes", "2", "--eps", "1e-3", "--lbfgs-iters", "1", "--into", str(tmp_path / "p.zarr"),
                 "--no-progress"]) == 0
    write_synthetic_store(tmp_path / "s.zarr", trials=4, batch_sizes=(1, 2, 4), budget=4, pool_size=64)
    assert main(["analyze", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "a"), "--n-boot", "0",
                 "--no-figures"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "grad_norm" in xr.open_zarr(tmp_path / "p.zarr")
        assert "train_loss" in xr.open_zarr(tmp_path / "R" / "train.zarr")
        assert len(xr.open_zarr(tmp_path / "p.zarr", group="sharpness").data_vars)
        assert "beta" in xr.open_zarr(tmp_path / "s.zarr", group="analysis")
        assert "grad_norm" in xr.open_zarr(tmp_path / "s.zarr")
        monitors = list((tmp_path / "R" / "runs").glob("*/monitor.zarr"))  # gradlab train's noise monitor
        assert monitors and all("b_noise" in xr.open_zarr(m) for m in monitors)


# ---- defect 11: local and distributed runs differ in the last bits ------------------------------------------------


@pytest.mark.slow
def test_defect_11_local_and_dask_worker_processes_write_identical_stores(tmp_path):
    """The driver runs torch with 2 threads, Dask worker processes with 1 (distributed sets OMP_NUM_THREADS=1):
    every unit now runs with the store's recorded thread count, so the stores are bitwise identical."""
    from distributed import LocalCluster

    from gradlab.probe.run import resolve_config, run_probe

    paths = tiny_run(tmp_path / "run", widths=[128, 128])
    config = resolve_config([str(paths["late"])], data="digits", batch_sizes=[1, 16, 512], budget=512,
                            trials=2, trials_per_unit=1, protocol="frozen")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_probe(config, tmp_path / "local.zarr")
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            run_probe(config, tmp_path / "dask.zarr", scheduler=cluster.scheduler_address)
    finally:
        torch.set_num_threads(old)
    assert_same_values(tmp_path / "dask.zarr", tmp_path / "local.zarr")


def test_defect_5_a_loss_that_fails_on_one_batch_during_the_run_is_one_line(tmp_path, capsys, monkeypatch):
    """A --loss that passes the first check but raises on a later batch (a hard-coded .view(4, -1), say) gave a
    41-line traceback and exit 1 (an external user's report); gradlab's own failures still show their traceback."""
    (tmp_path / "userloss.py").write_text(textwrap.dedent("""
        import torch.nn.functional as F

        def late(model, batch):
            x, y = batch
            if x.shape[0] > 4:
                raise ValueError("boom on a big batch")
            return F.cross_entropy(model(x), y, reduction="none")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main([*TRAIN_ARGS, "--out", str(tmp_path / "R")]) == 0
    ck = next((tmp_path / "R" / "runs").glob("*/epoch*.pt"))
    argv = ["probe", "--checkpoint", str(ck), "--data", "digits", "--loss", "userloss:late", "--protocol", "step",
            "--batch-sizes", "1,8", "--budget", "8", "--trials", "2", "--no-progress", "--out", str(tmp_path / "p.zarr")]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == ("gradlab: error: your code raised ValueError: boom on a big batch (at userloss.py:7 in late); "
                    "fix it and rerun (--debug shows the full traceback)")
    assert not (tmp_path / "p.zarr").exists()
    with pytest.raises(ValueError, match="boom"):
        main([*argv, "--debug"])


def test_defect_5_gradlabs_own_failure_keeps_its_traceback():
    """An exception whose innermost non-system frame is gradlab's is gradlab's failure: no one-line rewrite."""
    from gradlab.cli import user_code_failure
    from gradlab.task import batch_len

    with pytest.raises(Exception) as info:
        batch_len(object())
    assert user_code_failure(info.value, set()) is None
