"""Per-trial draws of training examples: explicit seeds, a paired design across batch sizes and checkpoints.

Trial ``t`` draws its ``N`` example indices with

.. code-block:: python

    rng = numpy.random.default_rng(numpy.random.SeedSequence([seed, t]))          # draws="common" (default)
    rng = numpy.random.default_rng(numpy.random.SeedSequence([seed, c, t]))       # draws="independent"
    indices = rng.choice(pool_size, size=N, replace=replacement)      # int64, in draw order

(``c`` = the checkpoint's position in the store's ``checkpoint`` dim, 0-based), so a trial depends only on
``(seed, t)`` or ``(seed, c, t)``: never on chunking, resume, worker count or order.  With ``common`` draws
(common random numbers) trial t uses the same examples at every checkpoint, so an early-vs-late comparison is
paired and its interval resamples trials jointly (the draw noise cancels in the difference); ``independent``
(the derivation of earlier gradlab stores) gives every checkpoint its own draws.  Without replacement (the
default) the N examples are a simple random sample of the pool of ``n = pool_size`` training examples;
``replacement=True`` draws them i.i.d. uniformly.  The same N examples serve every batch size of the trial (a paired design): minibatch
``k`` of size ``m`` is positions ``[k·m, (k+1)·m)`` of the draw, for ``k < N/m``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DRAWS = ("common", "independent")


def seed_derivation(draws: str = "common") -> str:
    """The sentence recorded in a probe store's ``seed_derivation`` attribute."""
    _check_draws(draws)
    key = "[seed, t]" if draws == "common" else "[seed, c, t]"
    scope = ("the same examples at every checkpoint (common random numbers)" if draws == "common" else
             "its own examples at each checkpoint c (0-based position in the checkpoint dim)")
    return (f"draws={draws}: trial t draws {scope} with numpy.random.default_rng(numpy.random.SeedSequence({key}))"
            ".choice(pool_size, budget, replace=replacement)")


def _check_draws(draws: str) -> None:
    if draws not in DRAWS:
        raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")


def trial_seed(seed: int, checkpoint_index: int, trial: int, draws: str = "common") -> np.random.SeedSequence:
    """The seed sequence of one trial: ``SeedSequence([seed, trial])`` (common draws) or
    ``SeedSequence([seed, checkpoint_index, trial])`` (independent draws per checkpoint)."""
    _check_draws(draws)
    if draws == "common":
        return np.random.SeedSequence([int(seed), int(trial)])
    return np.random.SeedSequence([int(seed), int(checkpoint_index), int(trial)])


def draw_trial(seed: int, checkpoint_index: int, trial: int, budget: int, pool_size: int,
               replacement: bool = False, draws: str = "common") -> np.ndarray:
    """Training-set indices (int64, shape ``(budget,)``) of one trial, in draw order (see the module docstring)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not replacement and budget > pool_size:
        raise ValueError(f"cannot draw {budget} examples without replacement from a pool of {pool_size}")
    rng = np.random.default_rng(trial_seed(seed, checkpoint_index, trial, draws))
    return rng.choice(int(pool_size), size=int(budget), replace=bool(replacement)).astype(np.int64)


def draw_trials(seed: int, checkpoint_index: int, trials: Sequence[int], budget: int, pool_size: int,
                replacement: bool = False, draws: str = "common") -> np.ndarray:
    """Stack :func:`draw_trial` over ``trials``: shape ``(len(trials), budget)``."""
    return np.stack([draw_trial(seed, checkpoint_index, t, budget, pool_size, replacement, draws) for t in trials]) \
        if len(trials) else np.zeros((0, budget), dtype=np.int64)


def minibatch_positions(budget: int, batch_size: int) -> np.ndarray:
    """Positions of every minibatch of the partition: shape ``(budget // batch_size, batch_size)``; row ``k`` is
    ``[k·m, (k+1)·m)``.  ``batch_size`` must divide ``budget``."""
    if budget % batch_size:
        raise ValueError(f"batch size {batch_size} does not divide the budget {budget}")
    return np.arange(budget, dtype=np.int64).reshape(budget // batch_size, batch_size)
