"""The Python API (gradlab.api) as a notebook uses it: the README's example runs as written, the API writes the
same stores as the CLI, and live objects are refused where they cannot go."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradlab
from gradlab.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_readme_notebook_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own model, data and loss", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippet.strip().splitlines()) <= 12
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONWARNINGS": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "my-report" / "summary.json").exists() and (tmp_path / "my-sharp.zarr" / "zarr.json").exists()


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_api_store_equals_the_cli_store_and_the_per_example_truth(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    ds = gradlab.probe({"ck": model}, data=(x, y), loss=_loss, out=tmp_path / "api.zarr", budget=16,
                       batch_sizes=[1, 4, 16], trials=2, dtype="float64", reduction="sum")
    # the CLI on the checkpoint the API saved, with importable factories, gives the same numbers
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\ng = torch.Generator().manual_seed(0)\n"
        "def model():\n    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))\n"
        "def data():\n    return DATA\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("m")
    mod.DATA = (x, y)
    from gradlab.cli import main

    assert main(["probe", "--checkpoint", f"ck={tmp_path / 'api.zarr.inputs' / 'ck.pt'}", "--model", "m:model",
                 "--data", "m:data", "--budget", "16", "--batch-sizes", "1,4,16", "--trials", "2", "--protocol",
                 "frozen", "--dtype", "float64", "--reduction", "sum", "--no-progress", "--out",
                 str(tmp_path / "cli.zarr")]) == 0
    import xarray as xr

    cli = xr.open_zarr(tmp_path / "cli.zarr", consolidated=False)
    np.testing.assert_array_equal(ds.minibatch_grad_norm.values, cli.minibatch_grad_norm.values)
    # and the full-draw norm is ‖Σ gᵢ‖ by per-example autograd
    rows = torch.as_tensor(ds.example_index.values[0, 0])
    model = model.double()
    total = torch.autograd.grad(_loss(model, (x[rows], y[rows])).sum(), list(model.parameters()))
    ref = torch.sqrt(sum((g ** 2).sum() for g in total)).item()
    assert ds.grad_norm.sel(batch_size=16).values[0, 0] == pytest.approx(ref, rel=1e-12)
    assert ds.attrs["loss"].startswith("live:loss:_loss-") and ds.attrs["data"].startswith("live:data:tuple-")


def test_live_objects_cannot_go_to_dask_workers(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(UsageError, match="cannot travel to Dask"):
        gradlab.probe(model, data=(torch.randn(8, 3), torch.tensor([0, 1] * 4)), loss=_loss, out=tmp_path / "w.zarr",
                      workers=2)


def test_train_api_with_a_factory_and_sharpness_on_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))

    def factory():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    t = gradlab.train(model=factory, data={"train": (x, y), "test": (x[:32], y[:32])}, out=tmp_path / "t",
                      batch_sizes=[16], epochs=2, lrs=[0.1])
    assert t.train_loss.shape == (1, 3) and np.isfinite(t.test_acc.values).all()
    ck = sorted((tmp_path / "t" / "runs").glob("*/epoch002.pt"))[0]
    s = gradlab.sharpness(ck, model=factory, data=(x, y), out=tmp_path / "s.zarr", samples=None, eps=(1e-3,))
    assert np.isfinite(s.lambda_max.values).all()


def test_numpy_data_is_refused_with_the_fix_and_a_refused_run_leaves_nothing(tmp_path):
    """NumPy data got 'data factory live:data:tuple-e3b0c44298fc returned tuple' (the digest of no tensors); a
    refused run left <out>.inputs/ with the saved model (both from an external user's report)."""
    import numpy as np
    import torch
    from torch import nn

    import gradlab
    from gradlab.errors import UsageError

    x, y = np.random.rand(40, 4).astype(np.float32), np.random.randint(0, 2, 40)
    with pytest.raises(UsageError, match=r"NumPy arrays; pass torch tensors, e\.g\. data=\(torch\.from_numpy"):
        gradlab.probe(nn.Linear(4, 2), data=(x, y), out=tmp_path / "a.zarr", batch_sizes=[1, 4], budget=8)
    with pytest.raises(UsageError, match="exceeds the 40 training examples"):
        gradlab.probe(nn.Linear(4, 2), data=(torch.from_numpy(x), torch.from_numpy(y)), out=tmp_path / "b.zarr",
                      batch_sizes=[1, 64], budget=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
