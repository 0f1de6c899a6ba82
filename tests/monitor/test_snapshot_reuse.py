"""At every=1 the distances' pass copies θ_{t+1} into the snapshot, and the next step skips its own copy unless θ
changed in place in between (then it copies afresh): the realized update norm is always ‖θ_{t+1} − θ_t‖ of the θ_t
the optimizer stepped from, on the training thread as after the worker hands over."""

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.monitor import NoiseMonitor


@pytest.mark.parametrize("background", [False, True])
def test_update_norm_after_an_in_place_edit_between_steps(tmp_path, background):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    want = []
    with NoiseMonitor(model, "cross-entropy", tmp_path / "s.zarr", optimizer=opt, background=background) as mon:
        for t in range(6):
            if t % 2 == 1:  # the user rescales the weights between steps (an in-place edit, as weight clipping is)
                with torch.no_grad():
                    model[0].weight.mul_(0.9)
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            mon.loss((x[t:t + 8], y[t:t + 8])).backward()
            opt.step()
            want.append(np.sqrt(sum(float(((p.detach() - b) ** 2).sum())
                                    for p, b in zip(model.parameters(), before))))
    got = xr.open_zarr(tmp_path / "s.zarr", consolidated=False).update_norm.sel(group="all").values
    if background:  # the first edit lands while the worker reads θ: that step's norms are NaN (noted), and the
        assert np.isnan(got[0]) and np.isfinite(got[1:]).all()  # monitor computes on the training thread after it
        got, want = got[1:], want[1:]
    np.testing.assert_allclose(got, want, rtol=1e-12)
