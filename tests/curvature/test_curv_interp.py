"""Keskar's parametric plot: endpoints reproduced exactly, buffers interpolated, incompatible states refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curv_cases import tiny_mlp, train_a_bit

from gradlab.curvature.evaluate import evaluate
from gradlab.curvature.interpolation import interpolate_state, parametric_curve
from gradlab.errors import UsageError


def test_alpha_zero_and_one_reproduce_the_endpoints_losses(digits):
    x, y = digits.train.x, digits.train.y
    small = train_a_bit(tiny_mlp(widths=(8,), batch_norm=True, seed=0), x, y, steps=30, lr=0.1, batch=8, seed=0)
    large = train_a_bit(tiny_mlp(widths=(8,), batch_norm=True, seed=0), x, y, steps=5, lr=0.5, batch=256, seed=1)
    splits = {"train": (x[:300], y[:300]), "test": (digits.test.x, digits.test.y)}
    curve = parametric_curve(small, small.state_dict(), large.state_dict(), np.array([0.0, 0.5, 1.0]), splits)
    for i, model in ((0, small), (2, large)):
        for s, (xs, ys) in splits.items():
            loss, acc = evaluate(model, xs, ys)
            assert curve[f"{s}_loss"][i] == loss
            assert curve[f"{s}_accuracy"][i] == acc
    assert curve["train_loss"][1] != curve["train_loss"][0]
    assert small.training  # the template was not switched to eval mode


def test_interpolated_state_includes_batch_norm_buffers():
    a = tiny_mlp(widths=(4,), batch_norm=True, seed=0).state_dict()
    b = {k: (v + 1 if v.is_floating_point() else v + 5) for k, v in a.items()}
    mid = interpolate_state(a, b, 0.5)
    assert torch.allclose(mid["layers.1.running_mean"], a["layers.1.running_mean"] + 0.5)
    assert torch.equal(mid["layers.1.num_batches_tracked"], a["layers.1.num_batches_tracked"])
    far = interpolate_state(a, {**b, "layers.1.running_var": a["layers.1.running_var"] - 3}, 2.0)
    assert (far["layers.1.running_var"] >= 0).all()


def test_different_architectures_are_refused():
    a = tiny_mlp(widths=(4,)).state_dict()
    b = tiny_mlp(widths=(5,)).state_dict()
    with pytest.raises(UsageError, match="differ in shape"):
        parametric_curve(tiny_mlp(widths=(4,)), a, b, np.array([0.0]), {})
