"""A tiny monitored training loop for the kill/resume tests: checkpoint (and monitor flush) every ``ckpt`` steps.

python train_script.py OUT STEPS [--resume] [--sleep S]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from gradlab.monitor import NoiseMonitor


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    return x, (x[:, 0] + 0.5 * torch.randn(16, generator=g, dtype=torch.float64) > 0).long()


def main(argv: list[str]) -> None:
    out, steps = Path(argv[0]), int(argv[1])
    resume = "--resume" in argv
    sleep = float(argv[argv.index("--sleep") + 1]) if "--sleep" in argv else 0.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    ckpt = out / "ckpt.pt"
    start = 0
    if resume and ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    mon = NoiseMonitor(model, "cross-entropy", out / "run.zarr", optimizer=opt, chunk_steps=4, resume=resume,
                       start_step=start if resume else None, ema_decay=0.8)
    for step in range(start, steps):
        opt.zero_grad()
        mon.loss(batch(step)).backward()
        opt.step()
        if (step + 1) % 6 == 0:  # a checkpoint after 6, 12, ... steps: flush the monitor first
            mon.flush()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, out / "tmp.pt")
            (out / "tmp.pt").replace(ckpt)
        print(step, flush=True)
        time.sleep(sleep)
    mon.close()


if __name__ == "__main__":
    main(sys.argv[1:])
