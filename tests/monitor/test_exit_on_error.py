"""A loop ended by an exception (in the user's loss, or anywhere) before the first step is not blamed on the
optimizer ("never stepped") when the monitor is closed: at the interpreter's exit, by a with block, or by close()."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gradlab.monitor import NoiseMonitor

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from gradlab.monitor import NoiseMonitor
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = NoiseMonitor(model, "cross-entropy", sys.argv[1], optimizer=opt)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    if sys.argv[2] == "loss":
        x = torch.randn(8, 4)  # a shape error inside the loss
    opt.zero_grad()
    mon.loss((x, y)).backward()
    if sys.argv[2] == "after":
        raise RuntimeError("the user's own error after backward")
""")


@pytest.mark.parametrize("where", ["loss", "after"])
def test_an_uncaught_exception_at_step_0_is_not_blamed_on_the_optimizer(tmp_path, where):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "m.zarr"), where], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert ("mat1 and mat2" in res.stderr) if where == "loss" else ("after backward" in res.stderr)
    assert "never stepped" not in res.stderr, res.stderr


def test_a_real_unstepped_optimizer_is_still_said(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "m.zarr"), "none"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "never stepped" in res.stderr


def _parts():
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), (torch.randn(8, 4), torch.randint(0, 2, (8,)))


def test_a_with_block_or_close_after_a_failed_loss_says_nothing_of_the_optimizer(tmp_path, caplog):
    model, opt, bad = _parts()
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        with pytest.raises(RuntimeError):
            with NoiseMonitor(model, "cross-entropy", tmp_path / "a.zarr", optimizer=opt):
                raise RuntimeError("anything in the loop")
        mon = NoiseMonitor(model, "cross-entropy", tmp_path / "b.zarr", optimizer=opt)
        with pytest.raises(RuntimeError):
            mon.loss(bad)
        mon.close()
    assert "never stepped" not in caplog.text
