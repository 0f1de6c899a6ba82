"""Learning-rate rules against their closed forms."""

from __future__ import annotations

import math

import pytest

from gradlab.errors import UsageError
from gradlab.lr_rules import LRRule


@pytest.mark.parametrize("scaling,expected", [("constant", 0.1), ("linear", 0.1 * 256 / 32),
                                              ("sqrt", 0.1 * math.sqrt(8)), ("sum", 0.1)])
def test_scaling(scaling, expected):
    rule = LRRule(lr=0.1, batch_size=256, scaling=scaling, base_batch_size=32)
    assert rule.lr_at(0, 10) == pytest.approx(expected)
    assert rule.reduction == ("sum" if scaling == "sum" else "mean")


def test_warmup_ramps_from_base_to_scaled_lr():
    rule = LRRule(lr=0.1, batch_size=128, scaling="linear", base_batch_size=32, warmup_epochs=2)
    steps = 10
    lrs = [rule.lr_at(s, steps) for s in range(25)]
    assert lrs[0] == pytest.approx(0.1 + (0.4 - 0.1) / 20)
    assert lrs[19] == pytest.approx(0.4) and lrs[24] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))


def test_step_decay():
    rule = LRRule(lr=1.0, batch_size=32, decay_epochs=(3, 6), decay_factor=0.1)
    assert [rule.lr_at(e * 5, 5) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cyclic_triangular2_with_sqrt_factor():
    rule = LRRule(lr=0.1, batch_size=128, base_batch_size=32, cyclic=True, cyclic_factor=10, cyclic_sqrt_factor=True,
                  cyclic_half_epochs=1)
    f = 10 * math.sqrt(32 / 128)
    assert rule.factor() == pytest.approx(5.0)
    steps = 100
    assert rule.lr_at(0, steps) == pytest.approx(0.1 / f)  # cycle start: lower bound
    assert rule.lr_at(100, steps) == pytest.approx(0.1 * f)  # first peak
    low = 0.1 / f
    assert rule.lr_at(300, steps) == pytest.approx(low + (0.1 * f - low) / 2)  # second peak halves


def test_sqrt_factor_never_below_one():
    assert LRRule(lr=0.1, batch_size=4096, base_batch_size=32, cyclic=True, cyclic_factor=2,
                  cyclic_sqrt_factor=True).factor() == 1.0


@pytest.mark.parametrize("kw", [{"lr": 0.0}, {"lr": -1.0}, {"lr": float("nan")}, {"scaling": "cubic"},
                                {"batch_size": 0}])
def test_bad_rules(kw):
    args = {"lr": 0.1, "batch_size": 32, **kw}
    with pytest.raises(UsageError):
        LRRule(**args)
