"""The CUDA paths against the CPU in float64: run on a machine with a GPU (skipped where torch sees none).

No GPU was lent to the sessions that wrote gradlab so far, so these are the checks a GPU session (or a user
with one) runs first: ``python -m pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlab.curvature.hvp import SampleObjective
from gradlab.models import build_model
from gradlab.probe.gram import GramEngine
from gradlab.probe.histogram import ScaledHistograms, entry_histogram_torch
from gradlab.probe.step import chain as chain_module
from gradlab.probe.step import step_trials

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
F64 = torch.float64


def _data(shape: tuple[int, ...], n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _draw(trials: int, budget: int, n: int) -> torch.Tensor:
    return torch.as_tensor(np.stack([np.random.default_rng(t).permutation(n)[:budget] for t in range(trials)]))


@pytest.mark.parametrize("name,shape,engine", [("mlp", (1, 8, 8), "chain"), ("mlp", (1, 8, 8), "chain-pending"),
                                               ("cnn", (3, 8, 8), "generic"), ("cnn", (3, 8, 8), "loop")])
def test_step_protocol_on_cuda_matches_cpu(monkeypatch, name, shape, engine):
    if engine == "chain-pending":
        # small thresholds, so that at m = 1 the first layer (64 -> 32) runs in input windows and the hidden weight
        # (32 -> 24) keeps pending low-rank updates
        monkeypatch.setattr(chain_module, "WINDOW_RANK", 8)
        monkeypatch.setattr(chain_module, "LOW_RANK", 8)
        engine = "chain"
    torch.manual_seed(0)
    net = build_model(name, shape, 10, **({"widths": [32, 24]} if name == "mlp" else {}))
    x, y = _data(shape)
    idx = _draw(3, 16, len(x))
    sel = [n for n, _ in net.named_parameters()]
    for m in (1, 4, 16):
        cpu = step_trials(net, x, y, idx, m, 0.1, "mean", sel, dtype=F64, engine=engine)
        gpu = step_trials(net, x, y, idx, m, 0.1, "mean", sel, dtype=F64, engine=engine, device="cuda")
        np.testing.assert_allclose(gpu.displacement, cpu.displacement, rtol=1e-10)
        np.testing.assert_allclose(gpu.step_norm_mean, cpu.step_norm_mean, rtol=1e-10)
        for n in sel:
            np.testing.assert_allclose(gpu.grad_sum[n], cpu.grad_sum[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (3, 8, 8))])
def test_gram_engine_on_cuda_matches_cpu(name, shape):
    torch.manual_seed(0)
    net = build_model(name, shape, 10)
    x, y = _data(shape, n=48)
    sel = [n for n, _ in net.named_parameters()]
    cpu = GramEngine(net, sel, dtype=F64)(x, y)
    gpu = GramEngine(net, sel, dtype=F64, device="cuda")(x, y)
    for n in sel:
        torch.testing.assert_close(gpu.gram[n].cpu(), cpu.gram[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gpu.grad_sum[n].cpu(), cpu.grad_sum[n], rtol=1e-10, atol=1e-12)


def test_histograms_on_cuda_match_cpu():
    v = torch.randn(100_000, dtype=F64) * 10.0 ** torch.empty(100_000, dtype=F64).uniform_(-14, 6)
    cpu, gpu = entry_histogram_torch(v), entry_histogram_torch(v.cuda())
    assert np.array_equal(cpu[0], gpu[0]) and cpu[1] == gpu[1]
    assert np.array_equal(ScaledHistograms(v).counts(1 / 3), ScaledHistograms(v.cuda()).counts(1 / 3))


def test_hessian_vector_products_on_cuda_match_cpu():
    torch.manual_seed(0)
    net = build_model("mlp", (1, 8, 8), 10, widths=[16])
    x, y = _data((1, 8, 8), n=40)
    cpu = SampleObjective(net, x, y)
    gpu = SampleObjective(net, x, y, device="cuda")
    v = torch.randn(cpu.n_params, dtype=F64)
    torch.testing.assert_close(gpu.hvp(v).cpu(), cpu.hvp(v), rtol=1e-10, atol=1e-12)
