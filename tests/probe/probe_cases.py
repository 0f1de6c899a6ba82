"""Shared helpers for the probe tests: real gradlab checkpoints of tiny MLPs on the embedded digits data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WIDTHS = [16, 12]


def make_run(folder: Path, *, seed: int = 0, widths: list[int] | None = None, nan_weight: bool = False
             ) -> dict[str, Path]:
    """Write ``init.pt`` (tag init), ``early.pt`` and ``late.pt`` (perturbed weights) with save_checkpoint."""
    from gradlab.checkpoint import Recipe, save_checkpoint
    from gradlab.models import build_model

    widths = list(widths or WIDTHS)
    g = torch.Generator().manual_seed(seed)
    recipe = Recipe("mlp", {"widths": widths}, (1, 8, 8), 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model("mlp", (1, 8, 8), 10, widths=widths)
    out = {"init": save_checkpoint(folder / "init.pt", net, recipe, {"tag": "init", "epoch": 0})}
    with torch.no_grad():
        for epoch, name in ((2, "early"), (30, "late")):
            for p in net.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            if nan_weight and name == "late":  # finite weights (NaN ones are refused) whose gradients overflow
                net.layers[0].weight[:, :] = 3e38
            out[name] = save_checkpoint(folder / f"{name}.pt", net, recipe, {"tag": name, "epoch": epoch})
    return out


def open_values(path: Path) -> dict[str, np.ndarray]:
    """Every variable and coordinate of a store as numpy arrays."""
    from gradlab.store import open_store

    ds = open_store(path, kind="probe")
    return {name: np.asarray(ds[name].values) for name in [*ds.data_vars, *ds.coords]}


def assert_same_values(a: Path, b: Path) -> None:
    va, vb = open_values(a), open_values(b)
    assert sorted(va) == sorted(vb)
    for name in va:
        x, y = va[name], vb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), name
        else:
            assert np.array_equal(x, y), name
