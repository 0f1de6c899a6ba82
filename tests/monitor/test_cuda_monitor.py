"""The monitor on CUDA equals the CPU in float64 (skipped where torch sees no GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from gradlab.monitor import NoiseMonitor
from .conftest import SeqNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _record(device: str, path, ids, y):
    torch.manual_seed(0)
    model = SeqNet().double().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with NoiseMonitor(model, "cross-entropy", path, optimizer=opt) as mon:
        for k in range(3):
            opt.zero_grad()
            mon.loss((ids.roll(k, 0).to(device), y.roll(k, 0).to(device))).backward()
            opt.step()
    return xr.open_zarr(path, consolidated=False)


def test_cuda_equals_cpu(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 11, (9, 5), generator=g), torch.randint(0, 3, (9,), generator=g)
    cpu = _record("cpu", tmp_path / "cpu.zarr", ids, y)
    gpu = _record("cuda", tmp_path / "gpu.zarr", ids, y)
    for name in ("gram_sum_layer", "gram_trace_layer", "b_noise", "update_norm", "dist_init", "loss"):
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-10, err_msg=name)
