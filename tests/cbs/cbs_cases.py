"""Shared helpers for the cbs tests: real gradlab checkpoints of a tiny MLP on the embedded digits data, with the
meta ``gradlab train`` writes (optimizer, momentum, rate applied, batch size, epoch, step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WIDTHS = [16]


def make_checkpoints(folder: Path, *, optimizer: str = "sgd", momentum: float = 0.0, lr: float = 0.05,
                     batch_size: int = 32) -> dict[str, Path]:
    """``early.pt`` (init weights) and ``late.pt`` (after 40 SGD steps on digits), both with train-style meta."""
    import torch.nn.functional as F

    from gradlab.checkpoint import Recipe, save_checkpoint
    from gradlab.datasets import load_data
    from gradlab.models import build_model

    data = load_data("digits")
    recipe = Recipe("mlp", {"widths": WIDTHS}, data.input_shape, 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("mlp", data.input_shape, 10, widths=WIDTHS)
    meta = {"optimizer": optimizer, "momentum": momentum, "lr": lr, "lr_applied": lr, "batch_size": batch_size,
            "reduction": "mean", "dataset": "digits"}
    out = {"early": save_checkpoint(folder / "early.pt", net, recipe, {**meta, "epoch": 0, "step": 0})}
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = data.train.x, data.train.y
    for k in range(40):
        idx = torch.randint(0, len(y), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    out["late"] = save_checkpoint(folder / "late.pt", net, recipe, {**meta, "epoch": 1, "step": 40})
    return out


def store_values(path: Path) -> dict[str, np.ndarray]:
    from gradlab.store import open_store

    ds = open_store(path, kind="cbs")
    return {name: np.asarray(ds[name].values) for name in [*ds.data_vars, *ds.coords]}


def assert_same_store(a: Path, b: Path) -> None:
    va, vb = store_values(a), store_values(b)
    assert sorted(va) == sorted(vb)
    for name in va:
        assert va[name].dtype == vb[name].dtype and va[name].shape == vb[name].shape, name
        if va[name].dtype.kind == "f":
            assert np.array_equal(va[name], vb[name], equal_nan=True), name
        else:
            assert np.array_equal(va[name], vb[name]), name


def make_low_loss_checkpoint(folder: Path) -> Path:
    """``adam.pt``: the digits MLP trained with Adam (lr 1e-2, batch 64, 600 steps) to a training loss near 0.03,
    with train-style meta (optimizer adam at lr 1e-2): branches restart its moments at zero."""
    import torch.nn.functional as F

    from gradlab.checkpoint import Recipe, save_checkpoint
    from gradlab.datasets import load_data
    from gradlab.models import build_model

    data = load_data("digits")
    recipe = Recipe("mlp", {"widths": WIDTHS}, data.input_shape, 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("mlp", data.input_shape, 10, widths=WIDTHS)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = data.train.x, data.train.y
    for _ in range(600):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    meta = {"optimizer": "adam", "momentum": 0.0, "lr": 1e-2, "lr_applied": 1e-2, "batch_size": 64,
            "reduction": "mean", "dataset": "digits", "epoch": 27, "step": 600}
    return save_checkpoint(folder / "adam.pt", net, recipe, meta)


def cbs_argv(ckpts: dict[str, Path], grid: list[str], out: Path, *extra: str) -> list[str]:
    """``gradlab cbs`` on the early and late checkpoints of :func:`make_checkpoints` with a test module's grid."""
    return ["cbs", "--checkpoint", f"early={ckpts['early']}", "--checkpoint", f"late={ckpts['late']}", *grid,
            "--out", str(out), *extra]
