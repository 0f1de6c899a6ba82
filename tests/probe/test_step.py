"""The step-protocol engine (gradlab.probe.step) against the blog's loop (gradlab.probe.naive) and closed forms."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torch import nn

from gradlab.errors import UsageError
from gradlab.models.mlp import MLP
from gradlab.probe.naive import naive_step_trials
from gradlab.probe import step as step_module
from gradlab.probe.step import chain as chain_module
from gradlab.probe.step import chain_buffers
from gradlab.probe.step import StepResult, chain_ops, step_trials

F64 = torch.float64


def _randomise(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _pool(shape: tuple[int, ...], n_classes: int, n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, n_classes, (n,), generator=g)


def _draw(trials: int, budget: int, n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (trials, budget), generator=g)


def _mlp() -> MLP:
    return _randomise(MLP(12, 5, widths=(9, 7)), seed=0)


def assert_results_close(a: StepResult, b: StepResult, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert a.grad_sum.keys() == b.grad_sum.keys()
    for name in a.grad_sum:
        assert a.grad_sum[name].shape == b.grad_sum[name].shape
        np.testing.assert_allclose(a.grad_sum[name], b.grad_sum[name], rtol=rtol, atol=atol, err_msg=name)
    for field in ("displacement", "step_norm_mean", "step_norm_std", "step_norm_max"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=rtol, atol=atol, err_msg=field)
    np.testing.assert_array_equal(a.nonfinite, b.nonfinite)


# (1) engine == naive loop, float64 --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch_size", [1, 2, 4, 8])
def test_chain_engine_matches_naive_loop(reduction: str, batch_size: int) -> None:
    model = _mlp()
    assert chain_ops(model) is not None
    x, y = _pool((1, 3, 4), 5)
    idx = _draw(3, 8, len(x))
    sel = ["layers.2.weight", "layers.0.bias", "layers.4.bias"]
    ref = naive_step_trials(model, x, y, idx, batch_size, 0.3, reduction, sel, dtype=F64)
    assert np.all(ref.displacement > 0) and np.all(ref.nonfinite == 0)
    for tpb in (1, 2, 3):
        got = step_trials(model, x, y, idx, batch_size, 0.3, reduction, sel, dtype=F64, trials_per_block=tpb)
        assert_results_close(got, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_pending_low_rank_updates_match_naive_loop(monkeypatch, reduction: str, batch_size: int) -> None:
    # with R = 16 both hidden weights of this MLP keep their SGD updates as low-rank factors for m <= 2 and flush
    # them into the weights mid-trial; at m = 4 the fused GEMM update is used instead
    monkeypatch.setattr(chain_module, "LOW_RANK", 16)
    monkeypatch.setattr(chain_module, "WINDOW_RANK", 0)  # the first layer too, not in an input window
    flushes = _count_low_rank_flushes(monkeypatch)
    model = _randomise(MLP(40, 5, widths=(48, 36)), seed=8, scale=0.2)
    x, y = _pool((1, 5, 8), 5)
    idx = _draw(3, 32, len(x))
    for sel in (["layers.4.weight"], ["layers.2.weight", "layers.4.bias"]):
        ref = naive_step_trials(model, x, y, idx, batch_size, 0.4, reduction, sel, dtype=F64)
        got = step_trials(model, x, y, idx, batch_size, 0.4, reduction, sel, dtype=F64, trials_per_block=2)
        assert_results_close(got, ref)
    # pending weights: both hidden weights in both selections (a recorded weight keeps pending factors too, and
    # its S is added at each flush), 2 blocks each, and per block N / R = 32 / 16 flushes (R update columns each)
    assert flushes[0] == (2 * 2 * 2 * 2 if batch_size <= 2 else 0)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_input_window_matches_naive_loop(monkeypatch, batch_size: int, bias: bool) -> None:
    # with a window of 32 rows the first layer (40 -> 48) runs K = 32/m steps from one precomputed X_w Wᵀ and Gram;
    # N = 48 ends on a partial window at every m, and m = 8 (K = 4) is the largest the window takes
    monkeypatch.setattr(chain_module, "WINDOW_RANK", 32)
    windows = [0]
    forward = chain_buffers.InputWindow.forward

    def counted(self, k: int, b: torch.Tensor | None) -> torch.Tensor:
        windows[0] += k % self.k_win == 0
        return forward(self, k, b)

    monkeypatch.setattr(chain_buffers.InputWindow, "forward", counted)
    model = _randomise(nn.Sequential(nn.Flatten(), nn.Linear(40, 48, bias=bias), nn.ReLU(), nn.Linear(48, 36),
                                     nn.ReLU(), nn.Linear(36, 5)), seed=8, scale=0.2)
    x, y = _pool((1, 5, 8), 5)
    idx = _draw(3, 48, len(x))
    for reduction in ("mean", "sum"):
        for sel in (["5.weight"], ["1.weight", "3.bias"] + (["1.bias"] if bias else [])):
            ref = naive_step_trials(model, x, y, idx, batch_size, 0.1, reduction, sel, dtype=F64)
            got = step_trials(model, x, y, idx, batch_size, 0.1, reduction, sel, dtype=F64, trials_per_block=2)
            assert_results_close(got, ref)
    # 2 reductions x 2 selections x 2 blocks, each with ceil(48 / 32) = 2 windows
    assert windows[0] == 2 * 2 * 2 * 2


def test_chain_engine_matches_naive_on_sequential_without_bias() -> None:
    model = _randomise(nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.ReLU(), nn.Linear(8, 8),
                                     nn.Linear(8, 3)), seed=3)
    assert chain_ops(model) is not None
    x, y = _pool((6,), 3)
    idx = _draw(2, 6, len(x))
    sel = ["0.weight", "4.weight"]
    ref = naive_step_trials(model, x, y, idx, 3, 0.2, "mean", sel, dtype=F64)
    got = step_trials(model, x, y, idx, 3, 0.2, "mean", sel, dtype=F64, engine="chain")
    assert_results_close(got, ref)


# (2) generic torch.func engine == naive, on a conv net with batch norm ---------------------------------------------


def _cnn(batch_norm: bool) -> nn.Module:
    mods: list[nn.Module] = [nn.Conv2d(1, 3, 3)]
    if batch_norm:
        mods.append(nn.BatchNorm2d(3))
    mods += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)]
    return _randomise(nn.Sequential(*mods), seed=4)


@pytest.mark.parametrize("engine", ["auto", "loop", "generic"])  # auto is loop on CPU
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_generic_and_loop_engines_match_naive_loop_on_cnn(batch_norm: bool, reduction: str, engine: str) -> None:
    model = _cnn(batch_norm)
    assert chain_ops(model) is None
    x, y = _pool((1, 6, 6), 4)
    idx = _draw(3, 4, len(x))
    sel = ["0.weight", f"{len(model) - 1}.bias"]
    for m in (1, 2, 4):
        ref = naive_step_trials(model, x, y, idx, m, 0.2, reduction, sel, dtype=F64)
        got = step_trials(model, x, y, idx, m, 0.2, reduction, sel, dtype=F64, trials_per_block=2,
                          engine=engine)  # type: ignore[arg-type]
        assert_results_close(got, ref)


def test_generic_engine_matches_chain_engine_on_mlp() -> None:
    model = _mlp()
    x, y = _pool((1, 3, 4), 5)
    idx = _draw(2, 8, len(x))
    sel = ["layers.4.weight"]
    a = step_trials(model, x, y, idx, 2, 0.3, "mean", sel, dtype=F64, engine="chain")
    b = step_trials(model, x, y, idx, 2, 0.3, "mean", sel, dtype=F64, engine="generic")
    assert_results_close(a, b)


# (3) analytic cases: softmax regression, closed-form gradients ----------------------------------------------------


def _softmax_regression_grads(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example gradients of ℓᵢ = −log softmax(W xᵢ + b)_{yᵢ}: (pᵢ − e_{yᵢ}) [xᵢᵀ, 1], shape (n, C, d + 1)."""
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return np.einsum("nc,nd->ncd", p, np.concatenate([x, np.ones((len(x), 1))], axis=1))


@pytest.mark.parametrize("engine", ["chain", "loop", "generic"])
def test_lr_zero_sum_is_sum_of_per_example_gradients_over_m(engine: str) -> None:
    model = _randomise(nn.Sequential(nn.Linear(5, 3)), seed=5)
    x, y = _pool((5,), 3)
    idx = _draw(2, 12, len(x))
    w, b = (p.detach().double().numpy() for p in model.parameters())
    for m, reduction in ((1, "mean"), (3, "mean"), (4, "sum"), (12, "mean")):
        r = step_trials(model, x, y, idx, m, 0.0, reduction, ["0.weight", "0.bias"], dtype=F64, engine=engine)
        for t in range(2):
            g = _softmax_regression_grads(w, b, x[idx[t]].double().numpy(), y[idx[t]].numpy())
            scale = 1.0 / m if reduction == "mean" else 1.0
            np.testing.assert_allclose(r.grad_sum["0.weight"][t], scale * g[:, :, :5].sum(0), rtol=1e-12)
            np.testing.assert_allclose(r.grad_sum["0.bias"][t], scale * g[:, :, 5].sum(0), rtol=1e-12)
            norms = [np.linalg.norm(scale * g[k * m:(k + 1) * m].sum(0)) for k in range(12 // m)]
            np.testing.assert_allclose(r.step_norm_mean[t], np.mean(norms), rtol=1e-12)
            np.testing.assert_allclose(r.step_norm_std[t], np.std(norms), rtol=1e-9, atol=1e-14)
            np.testing.assert_allclose(r.step_norm_max[t], np.max(norms), rtol=1e-12)
        assert np.all(r.displacement == 0.0) and np.all(r.nonfinite == 0)


def test_lr_zero_matches_per_example_autograd_on_mlp() -> None:
    model = _mlp()
    x, y = _pool((1, 3, 4), 5)
    idx = _draw(1, 8, len(x))
    net = _mlp().double()
    per_example = []
    for i in idx[0].tolist():
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i:i + 1].double()), y[i:i + 1]).backward()
        per_example.append(net.layers[2].weight.grad.clone())
    total = torch.stack(per_example).sum(0).numpy()
    r = step_trials(model, x, y, idx, 4, 0.0, "mean", ["layers.2.weight"], dtype=F64)
    np.testing.assert_allclose(r.grad_sum["layers.2.weight"][0], total / 4, rtol=1e-12)


def test_two_sgd_steps_follow_closed_form_and_displacement_is_lr_times_norm_of_sum() -> None:
    model = _randomise(nn.Sequential(nn.Linear(4, 3)), seed=6)
    x, y = _pool((4,), 3)
    idx = _draw(3, 6, len(x))
    lr = 0.7
    r = step_trials(model, x, y, idx, 3, lr, "mean", ["0.weight", "0.bias"], dtype=F64, trials_per_block=2)
    w0, b0 = (p.detach().double().numpy() for p in model.parameters())
    for t in range(3):
        xs, ys = x[idx[t]].double().numpy(), y[idx[t]].numpy()
        w, b, total = w0.copy(), b0.copy(), np.zeros((3, 5))
        for k in range(2):
            g = _softmax_regression_grads(w, b, xs[3 * k:3 * k + 3], ys[3 * k:3 * k + 3]).mean(0)
            total += g
            w, b = w - lr * g[:, :4], b - lr * g[:, 4]
        np.testing.assert_allclose(r.grad_sum["0.weight"][t], total[:, :4], rtol=1e-12)
        np.testing.assert_allclose(r.grad_sum["0.bias"][t], total[:, 4], rtol=1e-12)
        # θ_end − θ = −η S, so with every parameter selected the displacement is η ‖S‖
        np.testing.assert_allclose(r.displacement[t], lr * np.linalg.norm(total), rtol=1e-12)


# (4) non-finite values are counted, not raised ---------------------------------------------------------------------


def _count_low_rank_flushes(monkeypatch) -> list[int]:
    """Route LowRankUpdates.flush through a counter, so a test can prove the pending-update path ran."""
    calls = [0]
    flush = chain_buffers.LowRankUpdates.flush

    def counted(self) -> None:
        calls[0] += bool(self.r)
        flush(self)

    monkeypatch.setattr(chain_buffers.LowRankUpdates, "flush", counted)
    return calls


@pytest.mark.parametrize("engine", ["chain", "chain-low-rank", "chain-window", "loop", "generic"])
def test_inf_input_is_counted_per_trial_and_leaves_other_trials_alone(monkeypatch, engine: str) -> None:
    if engine == "chain-window":
        monkeypatch.setattr(chain_module, "WINDOW_RANK", 4)  # the first layer runs in windows of 4 steps at m = 1
        model, shape, flushes = _mlp(), (1, 3, 4), None
        assert min(model.layers[0].weight.shape) > 4
        engine = "chain"
    elif engine == "chain-low-rank":
        monkeypatch.setattr(chain_module, "LOW_RANK", 16)  # hidden weights keep pending updates at m = 1
        model, shape = _randomise(MLP(40, 5, widths=(48, 36)), seed=8, scale=0.2), (1, 5, 8)
        flushes = _count_low_rank_flushes(monkeypatch)
        engine = "chain"
    else:
        model, shape, flushes = _mlp(), (1, 3, 4), None
    x, y = _pool(shape, 5)
    x = x.clone()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[:24].reshape(3, 8)  # disjoint draws
    bad_example = int(idx[1, 5])  # trial 1, step 6 of 8 at m = 1
    x[bad_example, 0, 1, 2] = float("inf")
    sel = ["layers.4.weight", "layers.2.bias"]
    ref = naive_step_trials(model, x, y, idx, 1, 0.3, "mean", sel, dtype=F64)
    got = step_trials(model, x, y, idx, 1, 0.3, "mean", sel, dtype=F64, trials_per_block=3, engine=engine)
    n_params = sum(p.numel() for p in model.parameters())
    assert ref.nonfinite[1] > n_params  # at least every entry of the steps after the bad one
    assert ref.nonfinite[0] == ref.nonfinite[2] == 0
    assert np.isnan(got.displacement[1]) and np.isnan(got.step_norm_max[1])
    assert np.isnan(got.grad_sum["layers.4.weight"][1]).all()
    assert_results_close(got, ref)
    assert flushes is None or flushes[0] > 0


def test_inf_input_counted_in_float32_chain_engine() -> None:
    model = _mlp()
    x, y = _pool((1, 3, 4), 5)
    x = x.clone()
    idx = _draw(2, 4, len(x))
    x[int(idx[0, 3])] = float("-inf")
    r = step_trials(model, x, y, idx[:1], 1, 0.1, "sum", ["layers.4.bias"])
    ref = naive_step_trials(model, x, y, idx[:1], 1, 0.1, "sum", ["layers.4.bias"])
    assert r.nonfinite[0] == ref.nonfinite[0] > 0


def test_naive_loop_without_counting_marks_counts_as_missing() -> None:
    model = _mlp()
    x, y = _pool((1, 3, 4), 5)
    idx = _draw(2, 4, len(x))
    counted = naive_step_trials(model, x, y, idx, 2, 0.3, "sum", ["layers.4.weight"], dtype=F64)
    fast = naive_step_trials(model, x, y, idx, 2, 0.3, "sum", ["layers.4.weight"], dtype=F64, count_nonfinite=False)
    assert_results_close(fast, StepResult(counted.grad_sum, counted.displacement, counted.step_norm_mean,
                                          counted.step_norm_std, counted.step_norm_max, np.full(2, -1)), rtol=0)


# (5) the caller's model is not mutated -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_fn", [_mlp, lambda: _cnn(True)])
def test_callers_model_is_not_mutated(model_fn) -> None:
    model = model_fn()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = (_pool((1, 3, 4), 5) if isinstance(model, MLP) else _pool((1, 6, 6), 4))
    name = next(iter(dict(model.named_parameters())))
    for fn in (step_trials, naive_step_trials):
        fn(model, x, y, _draw(2, 4, len(x)), 2, 0.5, "mean", [name])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not model.training
    assert all(p.grad is None and p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


# (6) results do not depend on the block size ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_results_do_not_depend_on_trials_per_block(dtype: torch.dtype) -> None:
    model = _mlp()
    x, y = _pool((1, 3, 4), 5)
    idx = _draw(5, 8, len(x))
    sel = ["layers.4.weight", "layers.0.weight"]
    one = step_trials(model, x, y, idx, 2, 0.3, "mean", sel, dtype=dtype, trials_per_block=1)
    three = step_trials(model, x, y, idx, 2, 0.3, "mean", sel, dtype=dtype, trials_per_block=3)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert_results_close(one, three, rtol=tol, atol=tol * 1e-2)
    assert one.grad_sum["layers.4.weight"].dtype == (np.float32 if dtype == torch.float32 else np.float64)


def test_module_docstring_example_runs() -> None:
    assert doctest.testmod(step_module).failed == 0


# bad input -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 3}, "divisor"),
        ({"reduction": "avg"}, "reduction"),
        ({"selected": ["layers.9.weight"]}, "unknown parameter"),
        ({"selected": []}, "at least one"),
        ({"lr": float("nan")}, "lr"),
        ({"indices": torch.full((2, 4), 99)}, "indices"),
        ({"indices": torch.zeros((2, 0), dtype=torch.long)}, "at least one example"),
        ({"indices": torch.zeros((2, 4))}, "integer"),
        ({"trials_per_block": 0}, "trials_per_block"),
    ],
)
def test_bad_arguments_raise_usage_error(kwargs: dict, message: str) -> None:
    model = _mlp()
    x, y = _pool((1, 3, 4), 5)
    args = {"indices": _draw(2, 4, len(x)), "batch_size": 2, "lr": 0.1, "reduction": "mean",
            "selected": ["layers.4.weight"]}
    extra = {"trials_per_block": kwargs.pop("trials_per_block")} if "trials_per_block" in kwargs else {}
    args.update(kwargs)
    with pytest.raises(UsageError, match=message):
        step_trials(model, x, y, **args, **extra)


def test_zero_trials_give_empty_results() -> None:
    x, y = _pool((1, 3, 4), 5)
    r = step_trials(_mlp(), x, y, torch.zeros((0, 4), dtype=torch.long), np.int64(2), 0.1, "mean", ["layers.4.bias"])
    assert r.n_trials == 0 and r.grad_sum["layers.4.bias"].shape == (0, 5) and r.nonfinite.shape == (0,)


def test_dropout_model_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    x, y = _pool((1, 3, 4), 3)
    with pytest.raises(UsageError, match="dropout"):
        step_trials(model, x, y, _draw(1, 4, len(x)), 2, 0.1, "mean", ["1.weight"])


def test_chain_engine_refused_for_non_chain_model() -> None:
    x, y = _pool((1, 6, 6), 4)
    with pytest.raises(UsageError, match="chain"):
        step_trials(_cnn(False), x, y, _draw(1, 4, len(x)), 2, 0.1, "mean", ["0.weight"], engine="chain")


def test_unknown_engine_is_refused_and_every_named_engine_is_registered() -> None:
    x, y = _pool((1, 3, 4), 5)
    with pytest.raises(UsageError, match="engine must be"):
        step_trials(_mlp(), x, y, _draw(2, 4, len(x)), 2, 0.1, "mean", ["layers.4.bias"], engine="vmap")
    assert set(step_module.ENGINES) == {"chain", "loop", "generic"}
    for name, cls in step_module.ENGINES.items():
        assert cls.__module__ == f"gradlab.probe.step.{name}"  # one file per engine
