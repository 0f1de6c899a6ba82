"""Hessian-vector products: analytic linear regression, dense float64 MLP Hessian, no mutation, BN modes, bad losses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from curv_cases import dense_hessian, linreg, tiny_mlp
from torch import nn
from torch.autograd.function import once_differentiable

from gradlab.curvature.hvp import (
    NonFiniteCurvature,
    NotTwiceDifferentiable,
    SampleObjective,
    check_twice_differentiable,
)


def test_linreg_hvp_equals_2xtx_over_n_and_is_chunk_invariant():
    model, x, y, h = linreg(n=40, d=6)
    v = np.random.default_rng(1).standard_normal(6)
    for chunk in (40, 7, 1):
        obj = SampleObjective(model, x, y, loss="mse", chunk_size=chunk)
        np.testing.assert_allclose(obj.hvp(torch.from_numpy(v)).numpy(), h @ v, rtol=1e-12, atol=1e-12)
    w = model.weight.detach().numpy().ravel()
    resid = x.numpy() @ w - y.numpy().ravel()
    value, grad = obj.value_and_grad()
    assert value == pytest.approx(np.mean(resid**2), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), 2 * x.numpy().T @ resid / 40, rtol=1e-12, atol=1e-14)
    assert obj.hvp_count == 1


def test_mlp_hvp_matches_dense_torch_func_hessian(digits):
    model = tiny_mlp(widths=(5,))
    x, y = digits.train.x[:60], digits.train.y[:60]
    h = dense_hessian(model, x, y)
    obj = SampleObjective(model, x, y, chunk_size=17)
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(obj.n_params)
        np.testing.assert_allclose(obj.hvp(torch.from_numpy(v)).numpy(), h @ v, rtol=1e-9, atol=1e-11)


def test_callers_model_is_never_mutated(digits):
    model = tiny_mlp(widths=(6,), batch_norm=True)
    model.train()
    x, y = digits.train.x[:50], digits.train.y[:50]
    nn.functional.cross_entropy(model(x), y).backward()  # the caller has gradients lying around
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grad_ids = {n: id(p.grad) for n, p in model.named_parameters()}
    for mode in ("eval", "train"):
        obj = SampleObjective(model, x, y, bn_mode=mode, chunk_size=16)
        obj.hvp(torch.ones(obj.n_params, dtype=torch.float64))
        obj.value_and_grad(obj.theta0 + 0.1)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad
        assert id(p.grad) == grad_ids[n] and torch.equal(p.grad, grads[n])


def test_bn_eval_mode_uses_running_statistics_and_train_mode_batch_statistics(digits):
    model = tiny_mlp(widths=(6,), batch_norm=True)
    x, y = digits.train.x[:64], digits.train.y[:64]
    with torch.no_grad():  # non-trivial running statistics
        model.layers[1].running_mean.copy_(torch.linspace(-0.5, 0.5, 6))
        model.layers[1].running_var.copy_(torch.linspace(0.5, 2.0, 6))
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        eval_loss = float(nn.functional.cross_entropy(ref.eval()(x.double()), y))
        train_loss = float(nn.functional.cross_entropy(ref.train()(x.double()), y))
    assert abs(eval_loss - train_loss) > 1e-3
    assert SampleObjective(model, x, y, bn_mode="eval").value() == pytest.approx(eval_loss, rel=1e-12)
    assert SampleObjective(model, x, y, bn_mode="train", chunk_size=64).value() == pytest.approx(train_loss,
                                                                                                 rel=1e-12)


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _CutGradient(torch.autograd.Function):
    """Identity whose backward hands back a gradient detached from the graph."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.detach()


class _Wrapped(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.fn.apply(self.lin(x.flatten(1)))


class _CdistModel(nn.Module):
    """Logits = distances to 10 prototypes; cdist's backward has no derivative in torch."""

    def __init__(self):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.prototypes, compute_mode="donot_use_mm_for_euclid_dist")


def test_double_backward_error_raises_not_twice_differentiable(digits):
    obj = SampleObjective(_CdistModel(), digits.train.x[:20], digits.train.y[:20])
    with pytest.raises(NotTwiceDifferentiable, match="double backward through the model failed"):
        obj.hvp(torch.ones(obj.n_params))


def test_once_differentiable_function_detected_as_identically_zero_hessian(digits):
    obj = SampleObjective(_Wrapped(_OnceDifferentiableTanh), digits.train.x[:20], digits.train.y[:20])
    with pytest.raises(NotTwiceDifferentiable, match="identically zero"):
        check_twice_differentiable(obj, np.random.default_rng(0))


def test_cut_gradient_graph_detected_as_identically_zero_hessian(digits):
    obj = SampleObjective(_Wrapped(_CutGradient), digits.train.x[:20], digits.train.y[:20])
    with pytest.raises(NotTwiceDifferentiable, match="identically zero"):
        check_twice_differentiable(obj, np.random.default_rng(0))
    # the same linear model without the cut passes
    ok = SampleObjective(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits.train.x[:20], digits.train.y[:20])
    check_twice_differentiable(ok, np.random.default_rng(0))


def test_non_finite_parameters_raise_non_finite_curvature(digits):
    model = tiny_mlp(widths=(4,))
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("nan")
    obj = SampleObjective(model, digits.train.x[:20], digits.train.y[:20])
    with pytest.raises(NonFiniteCurvature, match="not finite"):
        check_twice_differentiable(obj, np.random.default_rng(0))
