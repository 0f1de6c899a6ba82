"""Trial draws: explicit seeds from (seed, checkpoint, trial), without/with replacement, paired minibatches."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.probe.sampling import draw_trial, draw_trials, minibatch_positions


def test_draw_depends_only_on_seed_checkpoint_trial():
    a = draw_trial(3, 1, 7, 50, 100, draws="independent")
    expected = np.random.default_rng(np.random.SeedSequence([3, 1, 7])).choice(100, size=50, replace=False)
    assert np.array_equal(a, expected)
    assert np.array_equal(draw_trials(3, 1, [5, 6, 7], 50, 100, draws="independent")[2], a)  # order does not matter
    assert not np.array_equal(a, draw_trial(3, 0, 7, 50, 100, draws="independent"))
    assert not np.array_equal(a, draw_trial(4, 1, 7, 50, 100, draws="independent"))


def test_common_draws_are_the_same_at_every_checkpoint():
    """Default: common random numbers across checkpoints, SeedSequence([seed, t])."""
    a = draw_trial(3, 1, 7, 50, 100)
    expected = np.random.default_rng(np.random.SeedSequence([3, 7])).choice(100, size=50, replace=False)
    assert np.array_equal(a, expected) and np.array_equal(a, draw_trial(3, 0, 7, 50, 100))
    assert not np.array_equal(a, draw_trial(3, 1, 6, 50, 100))
    with pytest.raises(ValueError, match="draws"):
        draw_trial(3, 1, 7, 50, 100, draws="paired")


def test_without_replacement_is_a_subset_and_with_replacement_repeats():
    a = draw_trial(0, 0, 0, 100, 100)
    assert sorted(a) == list(range(100))
    b = draw_trial(0, 0, 0, 100, 100, replacement=True)
    assert len(set(b.tolist())) < 100 and b.min() >= 0 and b.max() < 100
    with pytest.raises(ValueError, match="without replacement"):
        draw_trial(0, 0, 0, 101, 100)


def test_minibatches_partition_consecutive_positions():
    pos = minibatch_positions(12, 4)
    assert pos.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="does not divide"):
        minibatch_positions(12, 5)
