"""A resume is refused when anything the stored numbers depend on changed since the store was started: the code of a
``--model``/``--data``/``--loss`` factory (its source and the functions and constants of its module it uses), the
data's tensors (a factory reading a file that changed), the model's architecture -- for probe, train and sharpness
alike.  Unchanged inputs resume as before.  (The checkpoint files' SHA-256 was already checked.)"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from gradlab.cli import main
from gradlab.store import lock_path

MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    SEED = 1
    ACT = nn.Tanh

    def _xy(n=64, d=8, k=3, seed=SEED):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g)
        return x, x[:, :k].argmax(1)

    def cls():
        return _xy()

    def from_file():
        d = torch.load(DATA_FILE)
        return d["x"], d["y"]

    def from_file_split():
        d = torch.load(DATA_FILE)
        return {"train": (d["x"][:48], d["y"][:48]), "test": (d["x"][48:], d["y"][48:])}

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), ACT(), nn.Linear(16, 3))
''')


@pytest.fixture()
def user(tmp_path, monkeypatch):
    """A user module ``resmod`` on sys.path (no bytecode: every edit is re-read), its checkpoint, and ``edit(old,
    new)``, which changes its source and forgets the imported module -- as a new process would see it."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "resmod.py"
    data_file = tmp_path / "data.pt"
    src.write_text(MODULE.replace("DATA_FILE", repr(str(data_file))))
    write_data(data_file, seed=1)

    def edit(old: str, new: str) -> None:
        text = src.read_text()
        assert old in text
        src.write_text(text.replace(old, new))
        sys.modules.pop("resmod", None)
        importlib.invalidate_caches()

    sys.modules.pop("resmod", None)
    import resmod

    ckpt = tmp_path / "ck.pt"
    torch.save(resmod.make().state_dict(), ckpt)
    yield {"dir": tmp_path, "ckpt": ckpt, "edit": edit, "data_file": data_file}
    sys.modules.pop("resmod", None)


def write_data(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    torch.save({"x": x, "y": x[:, :3].argmax(1)}, path)


def probe_argv(user, out, data="resmod:cls", *extra):
    return ["probe", "--checkpoint", str(user["ckpt"]), "--model", "resmod:make", "--data", data, "--budget", "16",
            "--batch-sizes", "1,4", "--trials", "4", "--trials-per-unit", "1", "--protocol", "frozen",
            "--out", str(out), "--no-progress", *extra]


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("gradlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_probe_killed_then_data_factory_helper_edited_is_refused(user, tmp_path, capsys):
    """The exploratory tester's case: kill -9 mid-run, edit the module the data factory calls into (its source is
    unchanged: ``def cls(): return _xy()``), resume: refused, nothing mixed, attrs untouched."""
    out = tmp_path / "res_k.zarr"
    env = {**os.environ, "GRADLAB_PROBE_KILL_AFTER": "done:2", "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gradlab", *probe_argv(user, out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    before = dict(zarr.open_group(out, mode="r").attrs)
    done = np.asarray(zarr.open_group(out, mode="r")["done"][...]).copy()
    assert done.sum() == 2

    user["edit"]("SEED = 1", "SEED = 5")
    assert main([*probe_argv(user, out), "--resume"]) == 2
    line = one_error(capsys.readouterr().err)
    assert "the code of the data factory 'resmod:cls' changed since" in line and "another --out" in line
    after = zarr.open_group(out, mode="r")
    assert dict(after.attrs) == before and (np.asarray(after["done"][...]) == done).all()

    user["edit"]("SEED = 5", "SEED = 1")  # restored: the resume goes through
    assert main([*probe_argv(user, out), "--resume"]) == 0
    assert np.asarray(zarr.open_group(out, mode="r")["done"][...]).all()


def test_probe_resume_after_the_data_file_changed_is_refused(user, tmp_path, capsys):
    """The factory's code is the same, the file it reads is not: the data's SHA-256 catches it."""
    out = tmp_path / "p.zarr"
    assert main(probe_argv(user, out, "resmod:from_file")) == 0
    capsys.readouterr()
    assert main([*probe_argv(user, out, "resmod:from_file"), "--resume"]) == 0  # unchanged: fine
    write_data(user["data_file"], seed=5)
    assert main([*probe_argv(user, out, "resmod:from_file"), "--resume"]) == 2
    line = one_error(capsys.readouterr().err)
    assert "the data 'resmod:from_file' changed since" in line and "SHA-256 of its tensors" in line


def test_probe_resume_after_the_model_code_changed_is_refused(user, tmp_path, capsys):
    """Same weights, another activation (a module constant the factory uses): refused."""
    out = tmp_path / "p.zarr"
    assert main(probe_argv(user, out)) == 0
    capsys.readouterr()
    user["edit"]("ACT = nn.Tanh", "ACT = nn.ReLU")
    assert main([*probe_argv(user, out), "--resume"]) == 2
    assert "the code of the model factory 'resmod:make' changed since" in one_error(capsys.readouterr().err)


def test_a_store_made_before_the_fingerprints_still_checks_the_recorded_source(user, tmp_path, capsys):
    """Stores without ``task_sha256`` (older gradlab) compare the factories' source digests of their ``task``."""
    out = tmp_path / "p.zarr"
    assert main(probe_argv(user, out)) == 0
    capsys.readouterr()
    group = zarr.open_group(out, mode="r+")
    del group.attrs["task_sha256"]
    user["edit"]("def cls():\n    return _xy()", "def cls():\n    return _xy(seed=7)")
    assert main([*probe_argv(user, out), "--resume"]) == 2
    assert "the data factory 'resmod:cls' changed since" in one_error(capsys.readouterr().err)


def test_train_resume_after_the_data_changed_is_refused(user, tmp_path, capsys):
    out = tmp_path / "tr"
    argv = ["train", "--model", "resmod:make", "--data", "resmod:from_file", "--batch-sizes", "16", "--epochs", "1",
            "--monitor-every", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    write_data(user["data_file"], seed=5)
    assert main([*argv, "--resume"]) == 2
    assert "the data 'resmod:from_file' changed since" in one_error(capsys.readouterr().err)


def test_sharpness_resume_after_the_data_changed_is_refused(user, tmp_path, capsys):
    out = tmp_path / "sh.zarr"
    argv = ["sharpness", "--checkpoint", str(user["ckpt"]), "--model", "resmod:make", "--data", "resmod:from_file",
            "--samples", "32", "--top-k", "1", "--hutchinson-probes", "4", "--eps", "1e-3", "--lbfgs-iters", "1",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    write_data(user["data_file"], seed=5)
    assert main([*argv, "--resume"]) == 2
    assert "the data 'resmod:from_file' changed since" in one_error(capsys.readouterr().err)


def test_a_notebook_rerun_after_the_data_changed_uses_the_new_data(user, tmp_path):
    """In one process the probe's data pool is cached; a fresh store after the file changed must not reuse it."""
    import gradlab

    a = gradlab.probe(user["ckpt"], data="resmod:from_file", model="resmod:make", out=tmp_path / "a.zarr",
                      budget=16, batch_sizes=[1, 4], trials=2)
    write_data(user["data_file"], seed=5)
    b = gradlab.probe(user["ckpt"], data="resmod:from_file", model="resmod:make", out=tmp_path / "b.zarr",
                      budget=16, batch_sizes=[1, 4], trials=2)
    assert not np.allclose(a.grad_sq_norm.values, b.grad_sq_norm.values)
    assert a.attrs["task_sha256"] != b.attrs["task_sha256"]
    assert not lock_path(tmp_path / "x.zarr").exists()


def test_cbs_resume_after_the_data_file_changed_is_refused(user, tmp_path, capsys):
    """cbs records the data's and the model's digests too; the resume runs in a new process (as after a kill)."""
    out = tmp_path / "c.zarr"
    argv = ["cbs", "--checkpoint", str(user["ckpt"]), "--model", "resmod:make", "--data", "resmod:from_file_split",
            "--optimizer", "sgd", "--lr", "0.1", "--base-batch-size", "8", "--batch-sizes", "4,8", "--budget", "16",
            "--seeds", "1", "--evals", "2", "--eval-examples", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])]),
           "OMP_NUM_THREADS": "1"}

    def resume() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gradlab", *argv, "--resume"], env=env, capture_output=True,
                              text=True, timeout=300)

    assert resume().returncode == 0  # unchanged: fine
    write_data(user["data_file"], seed=5)
    proc = resume()
    assert proc.returncode == 2, proc.stderr
    assert "the data 'resmod:from_file_split' changed since" in one_error(proc.stderr)
