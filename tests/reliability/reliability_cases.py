"""Shared helpers of the reliability tests: tiny real runs, argv builders, and the one-line error check."""

from __future__ import annotations

import re
from pathlib import Path

import torch

# a tiny but real training grid: two runs of a small MLP on the embedded digits, 2 epochs
TRAIN_ARGS = ["train", "--model-kwargs", '{"widths": [16]}', "--batch-sizes", "256,512", "--epochs", "2",
              "--checkpoint-epochs", "1,2", "--no-progress"]


def tiny_run(folder: Path, *, widths: list[int] | None = None, seed: int = 0) -> dict[str, Path]:
    """``init.pt`` (tag init), ``early.pt`` and ``late.pt`` of a small MLP (perturbed weights), via save_checkpoint."""
    from gradlab.checkpoint import Recipe, save_checkpoint
    from gradlab.models import build_model

    widths = list(widths or [16, 12])
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
            out[name] = save_checkpoint(folder / f"{name}.pt", net, recipe, {"tag": name, "epoch": epoch})
    return out


def probe_argv(paths: dict[str, Path], out: Path, *extra: str, protocol: str = "frozen") -> list[str]:
    return ["probe", "--checkpoint", str(paths["early"]), "--checkpoint", str(paths["late"]), "--data", "digits",
            "--batch-sizes", "1,2,4", "--budget", "4", "--trials", "4", "--trials-per-unit", "2",
            "--protocol", protocol, "--out", str(out), "--no-progress", *extra]


_USAGE = re.compile(r"^usage: |^\s")  # argparse's own usage block precedes its one error line


def one_error_line(err: str) -> str:
    """The single ``gradlab: error:`` line of stderr; fails if there is a traceback or more than one line."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not _USAGE.match(ln)]
    errors = [ln for ln in lines if ln.startswith("gradlab: error:") or ln.startswith("gradlab ") and "error" in ln]
    assert len(errors) == 1, err
    assert [ln for ln in lines if not ln.startswith(("WARNING", "INFO"))] == errors, err
    return errors[0]
