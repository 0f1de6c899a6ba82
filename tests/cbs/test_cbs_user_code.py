"""`gradlab cbs` with the user's own model, data and loss, and its Python API: frozen parameters are held fixed
whichever engine runs, batch norm at batch size 1 is refused in one line, live objects and label mappings work
from Python, `budget` and `budget_tokens` together are refused, and a loss ≤ 0 gives no branching ratio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cbs_user
from cbs_cases import make_checkpoints
from gradlab.cli import main
from gradlab.errors import UsageError

RECIPE = ["--optimizer", "sgd", "--lr", "0.05", "--base-batch-size", "32"]
TINY = ["--data", "digits", "--batch-sizes", "4,16", "--budget", "32", "--seeds", "2", "--evals", "2",
        "--eval-examples", "64", "--no-progress", *RECIPE]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- 2. budget and budget_tokens ------------------------------------------------------------------------------


def test_budget_and_budget_tokens_together_are_refused_in_the_api(tmp_path):
    """cbs_job(budget=..., budget_tokens=...) dropped budget without a word; now one line names both arguments."""
    from gradlab.api import cbs_job

    ck = make_checkpoints(tmp_path)["early"]
    with pytest.raises(UsageError, match=r"budget=256 and budget_tokens=512 both given") as exc:
        cbs_job([str(ck)], data="shakespeare-char", batch_sizes=[4, 16], budget=256, budget_tokens=512)
    assert "--budget" not in str(exc.value) and len(str(exc.value).splitlines()) == 1
    # None is "not given": the default budget of 4096 examples (4,48: 48 does not divide it)
    with pytest.raises(UsageError, match="do not divide the budget of 4096 examples"):
        cbs_job([str(ck)], data="digits", batch_sizes=[4, 48], budget=None)


def test_the_cli_default_budget_is_4096_and_budget_tokens_alone_is_no_conflict(tmp_path, capsys):
    ck = make_checkpoints(tmp_path)["early"]
    out = tmp_path / "x.zarr"
    base = ["cbs", "--checkpoint", str(ck), "--seeds", "1", "--no-progress", "--out", str(out)]
    assert main([*base, "--data", "digits", "--batch-sizes", "4,48"]) == 2
    assert "do not divide the budget of 4096 examples" in _one_error_line(capsys.readouterr().err)
    # --budget-tokens without --budget: the CLI passes no budget, so no 'both given' refusal (the digits task is
    # refused for its own reason: not language modelling)
    assert main([*base, "--data", "digits", "--batch-sizes", "4,16", "--budget-tokens", "64"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "needs a language-modelling task" in line and "both given" not in line
    assert not out.exists()


# -- 5. the user's own model, data and loss -------------------------------------------------------------------


@pytest.fixture()
def user_code(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(cbs_user.__file__).rsplit("/", 1)[0])
    return tmp_path


def test_frozen_parameters_stay_frozen_with_the_default_engine(user_code, tmp_path, capsys):
    """A Linear/ReLU chain with a frozen first weight went to the lock-step chain engine, which steps every
    parameter: its losses differed from the loop engine's (torch.optim, frozen weight held).  Now such a model runs
    branch by branch (engine auto), the two agree, and --engine chain is refused in one line."""
    from gradlab.cbs.engine import supports_chain
    from gradlab.store import open_store

    assert not supports_chain(cbs_user.frozen_mlp(), "cross-entropy", torch.zeros(2, 1, 8, 8))
    ck = cbs_user.save_state(cbs_user.frozen_mlp, tmp_path / "frozen.pt")
    args = ["cbs", "--checkpoint", str(ck), "--model", "cbs_user:frozen_mlp", *TINY, "--dtype", "float64"]
    assert main([*args, "--out", str(tmp_path / "auto.zarr")]) == 0
    assert main([*args, "--engine", "loop", "--out", str(tmp_path / "loop.zarr")]) == 0
    a, b = (open_store(tmp_path / f"{n}.zarr", kind="cbs") for n in ("auto", "loop"))
    np.testing.assert_allclose(a.test_loss.values, b.test_loss.values, rtol=1e-12)
    np.testing.assert_allclose(a.train_loss.values, b.train_loss.values, rtol=1e-12)
    assert main([*args, "--engine", "chain", "--out", str(tmp_path / "chain.zarr")]) == 2
    assert "every parameter trainable" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "chain.zarr").exists()


def test_batch_norm_at_batch_size_one_is_one_line_and_runs_from_two(user_code, tmp_path, capsys):
    """BatchNorm1d in train mode at batch size 1 died in the first branch with torch's traceback ("Expected more
    than 1 value per channel when training"); it is refused before anything is written, and batch sizes ≥ 2 run."""
    from gradlab.store import open_store

    ck = cbs_user.save_state(cbs_user.bn_mlp, tmp_path / "bn.pt")
    base = ["cbs", "--checkpoint", str(ck), "--model", "cbs_user:bn_mlp", *TINY]
    out = tmp_path / "bn.zarr"
    assert main([*base, "--batch-sizes", "1,4", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "batch size 1 gives it one value per channel" in line and "--batch-sizes" in line
    assert not out.exists() and not any(p.name.startswith("bn.zarr") for p in tmp_path.iterdir())
    assert main([*base, "--batch-sizes", "2,8", "--budget", "16", "--out", str(out)]) == 0
    assert np.isfinite(open_store(out, kind="cbs").test_loss.values).all()


def test_python_api_takes_live_model_data_and_loss_and_a_label_mapping(tmp_path):
    """cbs_job passed a model factory straight to the checkpoint loader (TypeError) and str()-ed a data factory
    ('unknown dataset <function ...>'); they are registered like gradlab.api.probe's, an importable loss keeps its
    name, a lambda becomes a live object, and a mapping gives the labels."""
    from gradlab.api import cbs_job

    ck = cbs_user.save_state(cbs_user.regression_mlp, tmp_path / "reg.pt")
    kw = dict(batch_sizes=[4, 16], budget=32, seeds=1, n_evals=1, optimizer="sgd", lr=0.05, base_batch_size=8)
    job = cbs_job({"reg": str(ck)}, data=cbs_user.regression_data, model=cbs_user.regression_mlp,
                  loss=cbs_user.half_mse, **kw)
    assert [p.label for p in job.checkpoints] == ["reg"] and job.loss == "cbs_user:half_mse"
    assert job.data.startswith("live:data:") and job.model.startswith("live:model:")
    job = cbs_job(str(ck), data=cbs_user.regression_data(), model="cbs_user:regression_mlp",
                  loss=lambda model, batch: 0.5 * ((model(batch[0]) - batch[1]) ** 2).mean(-1), **kw)
    assert job.loss.startswith("live:loss:") and job.data.startswith("live:data:")
    assert cbs_job(str(ck), data=cbs_user.regression_data, model=cbs_user.regression_mlp, loss="mse",
                   **kw).loss == "mse"
    with pytest.raises(UsageError, match="checkpoints must be checkpoint files") as exc:
        cbs_job(cbs_user.regression_mlp(), data=cbs_user.regression_data, **kw)
    assert len(str(exc.value).splitlines()) == 1


def test_python_api_runs_a_regression_task_with_a_custom_loss(tmp_path):
    import gradlab.api

    ck = cbs_user.save_state(cbs_user.regression_mlp, tmp_path / "reg.pt")
    ds = gradlab.api.cbs(str(ck), data=cbs_user.regression_data, model=cbs_user.regression_mlp,
                         loss=lambda model, batch: 0.5 * ((model(batch[0]) - batch[1]) ** 2).mean(-1),
                         out=tmp_path / "reg.zarr", batch_sizes=[4, 16], budget=32, seeds=1, n_evals=2,
                         optimizer="sgd", lr=0.05, base_batch_size=8)
    assert np.isfinite(ds.test_loss.values).all() and bool(ds.done.values.all())


def test_branching_needs_a_positive_loss():
    """A custom loss below zero (a log-likelihood, say): r(m) = L(m)/L(m₀) − 1 flips sign, a worse batch size read
    as 'within tolerance'.  No estimate, and the note says why."""
    from gradlab.cbs.estimators import branching_estimate

    final = np.array([[-2.0, -2.1], [-1.0, -1.1], [-0.5, -0.4]])  # larger batch sizes are worse (higher loss)
    res = branching_estimate(final, [4, 16, 64], 0.05, n_boot=0)
    assert np.isnan(res.b_crit.value) and "needs a positive loss" in res.b_crit.note
