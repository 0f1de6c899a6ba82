"""Small stores of every kind written by the gradlab CLI, to pin "same command, same store" across refactors.

``python -m tests.golden.make_golden DIR`` writes, into DIR: a train grid (``train/train.zarr`` with its
checkpoints and the noise-monitor stores), probe stores of both protocols (``probe_step.zarr``,
``probe_frozen.zarr``) and a sharpness store (``sharpness.zarr``), all on the embedded digits with a tiny MLP and
one torch thread.  ``tests/golden/stores/`` holds the output of the code as it was before the runner redesign
(issue 11); ``tests/test_golden_stores.py`` writes them again and compares: data bitwise, attrs equal apart from
provenance and the folder the stores were written in.
"""

from __future__ import annotations

import sys
from pathlib import Path

COMMANDS: list[list[str]] = [
    ["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--data", "digits", "--batch-sizes", "64,256",
     "--lr", "0.05", "--epochs", "2", "--checkpoint-epochs", "1,2", "--lr-scaling", "linear",
     "--base-batch-size", "64", "--monitor-every", "3", "--out", "{d}/train", "--no-progress"],
    ["probe", "--checkpoint", "early={d}/train/runs/{run}/epoch001.pt", "--checkpoint",
     "late={d}/train/runs/{run}/epoch002.pt", "--data", "digits", "--batch-sizes", "1,4,16", "--budget", "16",
     "--trials", "3", "--trials-per-unit", "2", "--protocol", "step", "--keep", "histograms",
     "--out", "{d}/probe_step.zarr", "--no-progress"],
    ["probe", "--checkpoint", "early={d}/train/runs/{run}/epoch001.pt", "--checkpoint",
     "late={d}/train/runs/{run}/epoch002.pt", "--data", "digits", "--batch-sizes", "1,4,16", "--budget", "16",
     "--trials", "3", "--protocol", "frozen", "--keep", "vectors", "--dtype", "float64",
     "--out", "{d}/probe_frozen.zarr", "--no-progress"],
    ["sharpness", "--checkpoint", "{d}/train/runs/{run}/epoch002.pt", "--data", "digits", "--samples", "64",
     "--top-k", "2", "--hutchinson-probes", "8", "--eps", "1e-3", "--lbfgs-iters", "3", "--minibatch-sizes", "8",
     "--minibatch-trials", "2", "--dtype", "float64", "--out", "{d}/sharpness.zarr", "--no-progress"],
]

STORES = ("train/train.zarr", "probe_step.zarr", "probe_frozen.zarr", "sharpness.zarr")


def write_all(folder: str | Path) -> list[Path]:
    """Run every command of :data:`COMMANDS` into ``folder`` with one torch thread; returns the store paths."""
    import torch

    from gradlab.cli import main

    folder = Path(folder)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = None
        for cmd in COMMANDS:
            if run is None and cmd[0] != "train":
                runs = sorted(p.name for p in (folder / "train" / "runs").iterdir())
                run = runs[0]  # the batch-256 run (bs256_... sorts first)
            argv = [a.replace("{d}", str(folder)).replace("{run}", str(run)) for a in cmd]
            code = main(argv)
            if code:
                raise RuntimeError(f"gradlab {' '.join(argv)} exited {code}")
    finally:
        torch.set_num_threads(old)
    return [folder / s for s in STORES]


if __name__ == "__main__":
    write_all(sys.argv[1])
