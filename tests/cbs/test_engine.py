"""The lock-step branch engine against every branch as its own torch.optim training run, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlab.cbs import engine
from gradlab.cbs.job import eval_subset, example_stream


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gradlab.checkpoint import build_model_from, load_checkpoint
    from gradlab.datasets import load_data
    from gradlab.task import index_batch, to_run
    from cbs_cases import make_checkpoints

    paths = make_checkpoints(tmp_path_factory.mktemp("ck"))
    data = load_data("digits")
    model = build_model_from(load_checkpoint(paths["late"])).double()
    train = to_run(data.train.batch, dtype=torch.float64)
    test = to_run(data.test.batch, dtype=torch.float64)
    sub = torch.as_tensor(eval_subset(0, len(data.train), 200))
    return model, train, index_batch(train, sub), test


@pytest.mark.parametrize("recipe", [engine.Recipe("sgd", 0.0, 0.0), engine.Recipe("sgd", 0.9, 1e-3),
                                    engine.Recipe("adam", 0.0, 1e-4)], ids=["sgd", "momentum+wd", "adam"])
def test_chain_equals_loop_in_float64(setup, recipe):
    from gradlab.task import cross_entropy

    model, train, ev_train, ev_test = setup
    m, budget = 8, 256
    stream = np.stack([example_stream(0, s, budget, len(train[1])) for s in range(3)])
    lrs = [0.05, 0.1, 0.02] if recipe.optimizer == "sgd" else [1e-3, 3e-3, 1e-2]
    steps = [0, 1, 5, 16, 32]
    a = engine.chain_branches(model, *train, ev_train, ev_test, stream, lrs, m, steps, recipe, dtype=torch.float64)
    b = engine.loop_branches(model, cross_entropy, train, ev_train, ev_test, stream, lrs, m, steps, recipe,
                             dtype=torch.float64)
    assert np.abs(a.train_loss - b.train_loss).max() < 1e-12
    assert np.abs(a.test_loss - b.test_loss).max() < 1e-12
    assert (a.test_loss[:, -1] < a.test_loss[:, 0]).all()  # the branches do train
    assert (a.diverged_step == -1).all() and (b.diverged_step == -1).all()
    alone = engine.chain_branches(model, *train, ev_train, ev_test, stream[1:2], lrs[1:2], m, steps, recipe,
                                  dtype=torch.float64)
    assert np.array_equal(alone.test_loss[0], a.test_loss[1])  # a branch does not depend on its neighbours
    blocks = engine.chain_branches(model, *train, ev_train, ev_test, stream, lrs, m, steps, recipe,
                                   dtype=torch.float64, block=2)
    assert np.array_equal(blocks.test_loss, a.test_loss) and np.array_equal(blocks.train_loss, a.train_loss)


def test_divergence_is_recorded(setup):
    model, train, ev_train, ev_test = setup
    stream = np.stack([example_stream(0, 0, 64, len(train[1]))] * 2)
    res = engine.chain_branches(model, *train, ev_train, ev_test, stream, [0.05, 1e4], 4, [0, 4, 8, 16],
                                engine.Recipe("sgd"), dtype=torch.float64)
    assert res.diverged_step[0] == -1 and res.diverged_step[1] in (4, 8, 16)


def test_deferred_low_rank_sgd_updates_equal_the_loop(setup):
    """Plain SGD at small m on a weight wider than 2×64 both ways takes the pending low-rank path."""
    from gradlab.cbs.engine import _lazy_weights
    from gradlab.models import build_model
    from gradlab.probe.step.chain import chain_ops
    from gradlab.task import cross_entropy

    _, train, ev_train, ev_test = setup
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        wide = build_model("mlp", (1, 8, 8), 10, widths=[144, 144]).double()
    recipe = engine.Recipe("sgd")
    w = {n: p.detach().unsqueeze(0) if p.ndim == 2 else p.detach().view(1, 1, -1) for n, p in wide.named_parameters()}
    assert list(_lazy_weights(chain_ops(wide), w, 4, recipe)) == ["layers.2.weight"]
    stream = np.stack([example_stream(0, s, 128, len(train[1])) for s in range(2)])
    steps = [0, 3, 17, 32]
    a = engine.chain_branches(wide, *train, ev_train, ev_test, stream, [0.1, 0.3], 4, steps, recipe,
                              dtype=torch.float64)
    b = engine.loop_branches(wide, cross_entropy, train, ev_train, ev_test, stream, [0.1, 0.3], 4, steps, recipe,
                             dtype=torch.float64)
    assert np.abs(a.test_loss - b.test_loss).max() < 1e-12 and np.abs(a.train_loss - b.train_loss).max() < 1e-12
    assert (a.test_loss[:, -1] < a.test_loss[:, 0]).all()
