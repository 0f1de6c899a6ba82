"""examples_seen after a resume whose store lost its last steps (killed before a flush): never a wrong count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.errors import UsageError
from gradlab.monitor import NoiseMonitor

B = 16


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = x[:, :3].argmax(1)
    idx = torch.randint(0, 256, (12, B), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, [(x[i], y[i]) for i in idx]


def _step(mon, opt, batch):
    opt.zero_grad()
    mon.loss(batch).backward()
    opt.step()


def _killed_at_6(path, mode):
    """Steps 0..9, a checkpoint at step 6 (after 6 steps), then the process dies without writing its buffer."""
    model, opt, data = _setup()
    mon = NoiseMonitor(model, "cross-entropy", path, optimizer=opt, background=False)
    state = None
    for t in range(10):
        _step(mon, opt, data[t])
        if t == 5:
            ckpt = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
            if mode == "statedict":
                state = mon.state_dict()
    mon._rows = []  # killed: nothing buffered reaches the store
    mon._abandon()
    return ckpt, state, data


@pytest.mark.parametrize("mode", ["unknown", "given", "statedict"])
def test_examples_seen_after_a_resume_with_a_gap(tmp_path, caplog, mode):
    path = tmp_path / "m.zarr"
    (msd, osd), state, data = _killed_at_6(path, mode)
    model, opt, _ = _setup()
    model.load_state_dict(msd)
    opt.load_state_dict(osd)
    kw = {"examples_seen": 6 * B} if mode == "given" else {}
    with caplog.at_level("WARNING", logger="gradlab.monitor.monitor"):
        with NoiseMonitor(model, "cross-entropy", path, optimizer=opt, resume=True, start_step=6, **kw) as mon:
            for t in range(6, 12):
                _step(mon, opt, data[t])
            if mode == "unknown":
                assert mon.state_dict()["examples_seen"] == -1
    ds = xr.open_zarr(path, consolidated=False)
    steps = ds.step.values
    seen = ds.examples_seen.values[steps >= 6]
    truth = B * (np.arange(6, 12) + 1)  # 112 … 192
    if mode == "unknown":
        assert (seen == -1).all(), seen
        assert "examples_seen from step 6 on is not known" in caplog.text
        assert any("examples_seen=" in n for n in ds.attrs["notes"])
    else:
        np.testing.assert_array_equal(seen, truth)
        assert "not known" not in caplog.text


def test_a_resume_at_a_flushed_checkpoint_and_examples_seen_argument_is_checked(tmp_path):
    model, opt, data = _setup()
    with pytest.raises(UsageError, match="examples_seen"):
        NoiseMonitor(model, "cross-entropy", tmp_path / "x.zarr", optimizer=opt, examples_seen=-3)
    with NoiseMonitor(model, "cross-entropy", tmp_path / "m.zarr", optimizer=opt, examples_seen=100) as mon:
        _step(mon, opt, data[0])
    assert list(xr.open_zarr(tmp_path / "m.zarr", consolidated=False).examples_seen.values) == [116]
