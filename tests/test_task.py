"""The task contract (gradlab.task): any model, any per-example loss, any batch -- tested as a user would use it.

Every number is checked against float64 brute force: per-example autograd loops for minibatch gradient norms,
the naive SGD loop for the step protocol, dense Hessians for sharpness.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from gradlab.cli import main
from gradlab.errors import UsageError
from gradlab.task import check_task, checked_losses, cross_entropy, index_batch, lm, mse, resolve_loss

USER_MODULE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    def linear():                      # softmax regression on tabular data: a bare nn.Linear
        return nn.Linear(12, 4)

    def tabular():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 12, generator=g)
        y = torch.randint(0, 4, (96,), generator=g)
        return {"train": (x, y), "test": (x[:24], y[:24])}

    def flat_mlp():                    # an MLP written for flat inputs (no Flatten)
        return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))

    def regressor():
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))

    def regression():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 5, generator=g)
        return x, torch.stack([x[:, 0] * 2 - x[:, 1], x[:, 2].sin()], 1) + 0.1 * torch.randn(64, 2, generator=g)

    class Records(torch.utils.data.Dataset):   # Hugging Face style: dict items
        def __init__(self):
            g = torch.Generator().manual_seed(2)
            self.f = torch.randn(40, 12, generator=g)
            self.t = torch.randint(0, 4, (40,), generator=g)
        def __len__(self):
            return 40
        def __getitem__(self, i):
            return {"features": self.f[i], "target": int(self.t[i])}

    def records():
        return Records()

    def records_loss(model, batch):
        return F.cross_entropy(model(batch["features"]), batch["target"], reduction="none")

    def mean_loss(model, batch):        # already reduced: refused
        return F.cross_entropy(model(batch[0]), batch[1])

    def detached_loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none").detach()

    def nan_data():
        x = torch.randn(16, 12)
        x[3, 2] = float("nan")
        return x, torch.zeros(16, dtype=torch.long)

    def too_many_labels():
        return torch.randn(16, 12), torch.arange(16) % 6

    def raising():
        raise FileNotFoundError("my_table.csv")

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return torch.zeros(i + 1), 0

    def ragged():
        return Ragged()
''')


@pytest.fixture()
def user(tmp_path, monkeypatch):
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("usermod", None)
    mod = importlib.import_module("usermod")
    torch.manual_seed(0)
    torch.save(mod.linear().state_dict(), tmp_path / "linear.pt")
    torch.save(mod.flat_mlp().state_dict(), tmp_path / "mlp.pt")
    torch.save(mod.regressor().state_dict(), tmp_path / "reg.pt")
    return mod


def per_example_grads(model: nn.Module, loss, batch) -> torch.Tensor:
    """(N, P) per-example gradients by a plain autograd loop in float64."""
    model = model.double()
    rows = []
    n = len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    for i in range(n):
        one = index_batch(batch, slice(i, i + 1))
        g = torch.autograd.grad(loss(model, one).sum(), list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


# -- built-in losses: analytic values -------------------------------------------------------------------------
def test_builtin_losses_match_their_definitions():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 0])
    logits = lin(x)
    want = -torch.log_softmax(logits, 1)[torch.arange(5), y]
    torch.testing.assert_close(cross_entropy(lin, (x, y)), want, rtol=0, atol=1e-14)
    target = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(mse(lin, {"x": x, "y": target}), ((logits - target) ** 2).mean(1), rtol=0, atol=1e-14)

    class Tiny(nn.Module):  # logits (B, T, V) from token ids, returned HF-style in an object with .logits
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 6)

        def forward(self, ids):
            return type("Out", (), {"logits": self.emb(ids)})()

    net = Tiny().double()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    labels = torch.tensor([[2, 3, -100], [-100, -100, 1]])
    lp = torch.log_softmax(net.emb(ids), -1)
    want = torch.stack([-(lp[0, 0, 2] + lp[0, 1, 3]) / 2, -lp[1, 2, 1]])
    torch.testing.assert_close(lm(net, {"input_ids": ids, "labels": labels}), want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("bad, message", [
    (lambda m, b: F.cross_entropy(m(b[0]), b[1]), "scalar"),
    (lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")[:1], r"shape \(1,\)"),
    (lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none").detach(), "without grad"),
    (lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none") * float("nan"), "not finite"),
    (lambda m, b: [1.0, 2.0], "returned list"),
])
def test_loss_contract_violations_are_named(bad, message):
    model = nn.Linear(3, 2)
    batch = (torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(UsageError, match=message):
        checked_losses(bad, model, batch, name="mine")


def test_labels_out_of_range_for_the_model_are_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(UsageError, match=r"labels range over 0\.\.4 but the model gives 2 outputs"):
        check_task(model, cross_entropy, (torch.randn(6, 3), torch.tensor([0, 1, 4, 0, 1, 0])))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_class_labels_of_another_integer_dtype_get_the_fix(dtype):
    """int32 labels (common from NumPy on some platforms) failed deep in torch ('expected target dtype to be Long
    or Byte'); the loss now names the dtype and the fix (gradlab does not cast the user's data)."""
    model = nn.Linear(3, 2)
    with pytest.raises(UsageError, match=rf"needs int64 class indices, got {dtype}; give the labels as torch.long"):
        cross_entropy(model, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0], dtype=dtype)))
    emb = nn.Embedding(5, 5)
    with pytest.raises(UsageError, match=rf"needs int64 token labels, got {dtype}"):
        lm(emb, (torch.tensor([[1, 2]]), torch.tensor([[2, 3]], dtype=dtype)))


# -- probe on a user's tabular model and data (CLI, frozen and step) ------------------------------------------
@pytest.mark.parametrize("ckpt, model", [("linear.pt", "usermod:linear"), ("mlp.pt", "usermod:flat_mlp")])
def test_frozen_probe_of_a_tabular_model_matches_per_example_autograd(user, tmp_path, ckpt, model):
    out = tmp_path / "p.zarr"
    rc = main(["probe", "--checkpoint", str(tmp_path / ckpt), "--model", model, "--data", "usermod:tabular",
               "--protocol", "frozen", "--batch-sizes", "1,2,4,8", "--budget", "8", "--trials", "3",
               "--dtype", "float64", "--reduction", "sum", "--no-progress", "--out", str(out)])
    assert rc == 0
    ds = xr.open_zarr(out, consolidated=False)
    net = getattr(user, model.split(":")[1])()
    net.load_state_dict(torch.load(tmp_path / ckpt, weights_only=True))
    x, y = user.tabular()["train"]
    g = per_example_grads(net, cross_entropy, (x.double(), y))
    for t in range(3):
        rows = torch.as_tensor(ds.example_index.values[0, t])
        for i, m in enumerate([1, 2, 4, 8]):
            ref = g[rows].reshape(8 // m, m, -1).sum(1).norm(dim=1).numpy()
            got = ds.minibatch_grad_norm.values[0, i, t, :8 // m]
            np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_step_probe_with_a_user_loss_on_dict_batches_matches_the_naive_loop(user):
    from gradlab.datasets import load_data
    from gradlab.probe.naive import naive_step_trials
    from gradlab.probe.step import step_trials

    batch = load_data("usermod:records").train.batch
    assert set(batch) == {"features", "target"} and batch["target"].dtype == torch.int64  # collated, not cast
    torch.manual_seed(0)
    net = user.flat_mlp()
    idx = torch.stack([torch.randperm(40)[:8] for _ in range(3)])
    names = [n for n, _ in net.named_parameters()]
    kw = dict(dtype=torch.float64, loss=user.records_loss)
    for engine in ("loop", "generic"):
        fast = step_trials(net, batch, None, idx, 2, 0.1, "mean", names, engine=engine, **kw)
        slow = naive_step_trials(net, batch, None, idx, 2, 0.1, "mean", names, **kw)
        for n in names:
            np.testing.assert_allclose(fast.grad_sum[n], slow.grad_sum[n], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(fast.displacement, slow.displacement, rtol=1e-12)


def test_regression_probe_and_sharpness_through_the_cli(user, tmp_path):
    out = tmp_path / "r.zarr"
    common = ["--checkpoint", str(tmp_path / "reg.pt"), "--model", "usermod:regressor", "--data",
              "usermod:regression", "--loss", "mse"]
    assert main(["probe", *common, "--protocol", "frozen", "--batch-sizes", "1,4,16", "--budget", "16",
                 "--trials", "2", "--dtype", "float64", "--reduction", "sum", "--no-progress", "--out",
                 str(out)]) == 0
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["loss"] == "mse"
    import json

    task = json.loads(ds.attrs["task"])  # the task is recorded, user code with the SHA-256 of its source
    assert task["data"] == "usermod:regression" and len(task["model_source_sha256"]) == 64
    net = user.regressor()
    net.load_state_dict(torch.load(tmp_path / "reg.pt", weights_only=True))
    x, y = user.regression()
    g = per_example_grads(net, mse, (x.double(), y.double()))
    rows = torch.as_tensor(ds.example_index.values[0, 0])
    np.testing.assert_allclose(ds.grad_norm.values[0, 1, 0], g[rows].sum(0).norm().item(), rtol=1e-12)

    sharp = tmp_path / "s.zarr"
    assert main(["sharpness", *common, "--full", "--eps", "1e-3", "--top-k", "2", "--no-progress",
                 "--out", str(sharp)]) == 0
    s = xr.open_zarr(sharp, consolidated=False)
    net = net.double()
    params = list(net.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def full_loss(theta):
        out, i = {}, 0
        for (name, p) in net.named_parameters():
            out[name] = theta[i:i + p.numel()].view_as(p)
            i += p.numel()
        return mse(lambda xx: torch.func.functional_call(net, out, (xx,)), (x.double(), y.double())).mean()

    hess = torch.autograd.functional.hessian(full_loss, flat)
    top = torch.linalg.eigvalsh(hess).flip(0)[:2].numpy()
    np.testing.assert_allclose(s.eigenvalues.values[0], top, rtol=1e-8)
    assert np.isnan(s.train_accuracy.values[0])  # not a classification task: no invented accuracy


def test_train_on_user_regression_and_dtype_on_request(user, tmp_path, capsys):
    args = ["train", "--model", "usermod:regressor", "--data", "usermod:regression", "--loss", "mse",
            "--batch-sizes", "16", "--epochs", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "t")]) == 0
    ds = xr.open_zarr(tmp_path / "t" / "train.zarr", consolidated=False)
    loss = ds.train_loss.values[0]
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0] and np.isnan(ds.train_acc.values).all()
    assert main([*args, "--dtype", "float64", "--out", str(tmp_path / "t64")]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--loss", "usermod:mean_loss"], "already reduced"),
    (["--loss", "usermod:detached_loss"], "without grad"),
    (["--loss", "nope"], "unknown loss 'nope'"),
    (["--data", "usermod:nan_data"], "non-finite"),
    (["--data", "usermod:too_many_labels"], "labels range over 0..5 but the model gives 4 outputs"),
    (["--data", "usermod:raising"], "raised FileNotFoundError: my_table.csv"),
    (["--data", "usermod:ragged"], "cannot be collated"),
    (["--loss", "mse"], "mse loss needs floating targets"),
])
def test_bad_task_input_is_one_line_exit_2_and_nothing_written(user, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.zarr"
    args = {"--data": "usermod:tabular", "--loss": "cross-entropy"}
    args.update(dict(zip(extra[::2], extra[1::2])))
    flat = [a for kv in args.items() for a in kv]
    rc = main(["probe", "--checkpoint", str(tmp_path / "linear.pt"), "--model", "usermod:linear", *flat,
               "--protocol", "frozen", "--batch-sizes", "1,2", "--budget", "8", "--trials", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_resolve_loss_accepts_names_specs_and_callables(user):
    assert resolve_loss("cross-entropy") is cross_entropy and resolve_loss("ce") is cross_entropy
    assert resolve_loss("usermod:records_loss") is user.records_loss
    assert resolve_loss(user.records_loss) is user.records_loss


def test_sparse_labels_do_not_silently_make_a_hundred_class_model(tmp_path, monkeypatch, capsys):
    # issue 16 item 10: labels 0 and 99 from a user factory used to build a 100-class zoo model without a word
    (tmp_path / "gl_sparse_labels.py").write_text("import torch\ndef data():\n"
                                        "    return torch.randn(20, 5), torch.tensor([0, 99] * 10)\n"
                                        "def model():\n    return torch.nn.Linear(5, 100)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = main(["train", "--model", "mlp", "--data", "gl_sparse_labels:data", "--epochs", "1", "--batch-sizes",
               "4",
               "--no-progress", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "2 distinct values ranging up to 99" in err and "0..1" in err, err
    assert not (tmp_path / "t").exists()
    # a user's own model with 100 outputs is taken as it is: only zoo models are sized from the labels
    assert main(["train", "--model", "gl_sparse_labels:model", "--data", "gl_sparse_labels:data", "--epochs", "1",
                 "--batch-sizes", "4", "--no-progress", "--out", str(tmp_path / "own")]) == 0


def test_train_records_the_noise_monitor_on_request(user, tmp_path):
    assert main(["train", "--model", "usermod:linear", "--data", "usermod:tabular", "--batch-sizes", "16",
                 "--epochs", "2", "--monitor-every", "2", "--no-progress", "--out", str(tmp_path / "t")]) == 0
    (store,) = (tmp_path / "t" / "runs").glob("*/monitor.zarr")
    from gradlab.monitor import open_monitor

    ds = open_monitor(store)
    assert ds.sizes["step"] == 6 and list(ds.step.values) == [0, 2, 4, 6, 8, 10]  # 96/16 = 6 steps x 2 epochs
    assert np.isfinite(ds.grad_sq_norm.sel(group="all").values).all()
