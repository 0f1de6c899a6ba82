"""The probe on a user's own model, data and output folder: batch norm with a batch of one, dropout, a forward that
raises, float64 models and data, an ``--out`` that is not a store, a language model without ``--loss lm``, a
negative learning rate, and the Python API's wording -- each one line (exit 2) or the right numbers."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from gradlab.cli import main
from gradlab.errors import UsageError
from gradlab.store import lock_path

MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def bn_only():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def drop():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        def forward(self, x):
            if x.shape[0] == 4:
                raise RuntimeError("picky forward refuses batches of four")
            return self.net(x)

    def picky():
        return Picky()

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20)
        def forward(self, ids):
            return self.head(self.emb(ids))

    def lm():
        return TinyLM()

    def _xy(n=64, seed=1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return x, x[:, :3].argmax(1)

    def cls():
        return _xy()

    def cls_f64():
        x, y = _xy()
        return x.double(), y

    def tokens():
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, 20, (64, 9), generator=g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
''')


@pytest.fixture()
def user(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "usermod2.py").write_text(MODULE)
    sys.modules.pop("usermod2", None)
    import usermod2

    cks = {}
    for name in ("make", "bn_only", "drop", "picky", "lm"):
        cks[name] = tmp_path / f"{name}.pt"
        torch.save(getattr(usermod2, name)().state_dict(), cks[name])
    yield {"module": usermod2, "ckpt": cks, "dir": tmp_path}
    sys.modules.pop("usermod2", None)


def argv(user, model, out, *extra, data="usermod2:cls"):
    return ["probe", "--checkpoint", str(user["ckpt"][model]), "--model", f"usermod2:{model}", "--data", data,
            "--budget", "16", "--trials", "2", "--out", str(out), "--no-progress", *extra]


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("gradlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def refused(user, out, capsys, *args, **kw) -> str:
    assert main(argv(user, *args[:1], out, *args[1:], **kw)) == 2
    line = one_error(capsys.readouterr().err)
    assert not out.exists() and not lock_path(out).exists()
    return line


# ---- batch norm, dropout, a forward that raises ---------------------------------------------------------------------

def test_step_probe_refuses_a_batch_of_one_for_train_mode_batch_norm(user, tmp_path, capsys):
    line = refused(user, tmp_path / "bn.zarr", capsys, "bn_only", "--protocol", "step", "--batch-sizes", "1,4,16")
    assert "batch norm in train mode needs at least 2 examples per batch" in line
    assert "batch size 1 in --batch-sizes" in line and "--protocol frozen" in line


def test_the_model_mode_is_said_once_and_recorded(user, tmp_path, caplog):
    for protocol, sizes, mode in (("step", "2,4,16", "train"), ("frozen", "1,4,16", "eval")):
        caplog.clear()
        out = tmp_path / f"{protocol}.zarr"
        assert main(argv(user, "bn_only", out, "--protocol", protocol, "--batch-sizes", sizes)) == 0
        said = [r.getMessage() for r in caplog.records if "runs the model in" in r.getMessage()]
        assert len(said) == 1 and f"{mode} mode" in said[0]
        assert xr.open_zarr(out, consolidated=False).attrs["model_mode"] == mode
    caplog.clear()
    assert main(argv(user, "make", tmp_path / "plain.zarr", "--batch-sizes", "4")) == 0
    assert not [r for r in caplog.records if "runs the model in" in r.getMessage()]  # no BN, no dropout: quiet


def test_step_probe_refuses_dropout_and_names_the_eval_mode_way_out(user, tmp_path, capsys):
    line = refused(user, tmp_path / "d.zarr", capsys, "drop", "--protocol", "step", "--batch-sizes", "4")
    assert "active dropout" in line and "--protocol frozen" in line and "eval mode" in line


def test_a_user_forward_raising_mid_run_is_one_line_naming_the_users_frame(user, tmp_path, capsys):
    """The task check passes (2 examples); the step protocol's first minibatch of 4 raises inside the user's code."""
    out = tmp_path / "picky.zarr"
    assert main(argv(user, "picky", out, "--protocol", "step", "--batch-sizes", "2,4")) == 2
    line = one_error(capsys.readouterr().err)
    assert "RuntimeError: picky forward refuses batches of four" in line and "usermod2.py" in line
    assert not out.exists()


# ---- dtypes ----------------------------------------------------------------------------------------------------------

def _reference(user, data, dtype=torch.float64):
    net = user["module"].make().to(dtype).eval()
    x, y = data
    x = x.to(dtype)
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), list(net.parameters()))]) for i in range(len(x))])
    mean = g.mean(0)
    return float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())


def test_float64_data_runs_in_float64_by_default_and_says_so(user, tmp_path, caplog):
    out = tmp_path / "f64.zarr"
    assert main(argv(user, "make", out, "--protocol", "frozen", "--budget", "64", "--batch-sizes", "1,64",
                     data="usermod2:cls_f64")) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("computing in")]
    assert len(said) == 1 and "float64" in said[0] and "the model's float32 tensors" in said[0]
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["dtype"] == "float64" and ds.attrs["dtype_cast"].startswith("model float32 -> float64")
    g2, tr = _reference(user, user["module"].cls_f64())
    np.testing.assert_allclose(ds.grad_sq_norm.values[0], g2, rtol=1e-10)
    np.testing.assert_allclose(ds.trace_cov.values[0], tr, rtol=1e-10)


def test_an_explicit_dtype_that_narrows_the_data_is_said_and_recorded(user, tmp_path, caplog):
    out = tmp_path / "f32.zarr"
    assert main(argv(user, "make", out, "--protocol", "frozen", "--batch-sizes", "4", "--dtype", "float32",
                     data="usermod2:cls_f64")) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("computing in")]
    assert len(said) == 1 and "the data's float64 tensors" in said[0] and "lose precision" in said[0]
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["dtype"] == "float32" and ds.attrs["dtype_cast"] == "data float64 -> float32 (requested)"


def test_float32_model_and_data_stay_float32_without_a_word(user, tmp_path, caplog):
    out = tmp_path / "plain.zarr"
    assert main(argv(user, "make", out, "--protocol", "frozen", "--batch-sizes", "4")) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith("computing in")]
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["dtype"] == "float32" and ds.attrs["dtype_cast"] == "none"


@pytest.mark.parametrize("protocol", ["step", "frozen"])
def test_kept_vectors_are_stored_in_the_run_dtype(user, tmp_path, protocol):
    out = tmp_path / "v.zarr"
    assert main(argv(user, "make", out, "--protocol", protocol, "--batch-sizes", "4,16", "--keep", "vectors",
                     "--dtype", "float64", "--lr", "0")) == 0
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.grad_sum.dtype == np.float64
    # lr = 0: S = Σ_k ∇L_{B_k}(θ) = (N/m)·ḡ_N for mean reduction at every m: its norm is the stored one
    np.testing.assert_allclose(np.linalg.norm(ds.grad_sum.values, axis=-1), ds.grad_norm.values, rtol=1e-12)


def test_the_api_runs_a_live_float64_model_in_float64(user, tmp_path):
    import gradlab

    m64 = user["module"].make().double()
    x, y = user["module"].cls()
    ds = gradlab.probe(m64, data=(x.double(), y), out=tmp_path / "a.zarr", budget=64, batch_sizes=[1, 64],
                       trials=2)
    assert ds.attrs["dtype"] == "float64" and ds.attrs["dtype_cast"] == "none"
    g2, tr = _reference(user, (x.double(), y))
    np.testing.assert_allclose(ds.grad_sq_norm.values[0], g2, rtol=1e-10)
    np.testing.assert_allclose(ds.trace_cov.values[0], tr, rtol=1e-10)


# ---- --out, --loss, --lr ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_out_that_is_not_a_store_is_named_at_once(user, tmp_path, capsys, kind, resume):
    out = tmp_path / "other"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    assert main(argv(user, "make", out, "--batch-sizes", "4", *(["--resume"] if resume else []))) == 2
    line = one_error(capsys.readouterr().err)
    assert "not a gradlab store" in line and "choose another --out or remove it" in line
    assert "pass --resume" not in line
    assert not lock_path(out).exists()  # a refused run leaves no lock file behind
    assert (out / "notes.txt").read_text() == "mine" if kind == "folder" else out.read_text() == "mine"


def test_an_empty_existing_folder_is_used_as_the_store(user, tmp_path):
    out = tmp_path / "empty.zarr"
    out.mkdir()
    assert main(argv(user, "make", out, "--batch-sizes", "4")) == 0
    assert xr.open_zarr(out, consolidated=False).done.values.all()


def test_a_language_model_without_loss_lm_gets_the_hint(user, tmp_path, capsys):
    line = refused(user, tmp_path / "lm.zarr", capsys, "lm", "--batch-sizes", "4", data="usermod2:tokens")
    assert "got logits (2, 8, 20) and targets (2, 8)" in line and "use --loss lm" in line


def test_a_negative_learning_rate_is_refused(user, tmp_path, capsys):
    line = refused(user, tmp_path / "lr.zarr", capsys, "make", "--batch-sizes", "4", "--lr=-0.1")
    assert "--lr must be >= 0" in line


# ---- the Python API names its own arguments --------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "said", "not_said"), [
    ({"budget": 0, "batch_sizes": [4]}, "budget= must be >= 1", "--budget"),
    ({"trials": 0}, "trials= must be >= 1", "--trials"),
    ({"batch_sizes": [3]}, "pick divisors of budget= (in batch_sizes=)", "--batch-sizes"),
    ({"budget": 128, "batch_sizes": [4]}, "pass replacement=True", "--replacement"),
    ({"params": "nothing"}, "params= 'nothing' matches no parameter", "--params"),
    ({"lr": -1.0}, "lr= must be >= 0", "--lr"),
])
def test_api_errors_name_the_api_arguments(user, tmp_path, kwargs, said, not_said):
    import gradlab

    x, y = user["module"].cls()
    with pytest.raises(UsageError) as err:
        gradlab.probe(user["module"].make(), data=(x, y), out=tmp_path / "a.zarr", **{"budget": 16, **kwargs})
    assert said in str(err.value) and not_said not in str(err.value)


def test_api_store_errors_name_resume_and_out(user, tmp_path):
    import gradlab

    x, y = user["module"].cls()
    net = user["module"].make()
    gradlab.probe(net, data=(x, y), out=tmp_path / "a.zarr", budget=16, batch_sizes=[4], trials=2)
    with pytest.raises(UsageError) as err:
        gradlab.probe(net, data=(x, y), out=tmp_path / "a.zarr", budget=16, batch_sizes=[4], trials=2)
    assert "pass resume=True to continue it, or choose another out=" in str(err.value)
    with pytest.raises(UsageError) as err:
        gradlab.probe(net, data=(x, y), out=tmp_path / "a.zarr", budget=16, batch_sizes=[4], trials=3, resume=True)
    assert "resume it with the same arguments, or write a new store with another out=" in str(err.value)
    assert "--" not in str(err.value).split("(")[0] + str(err.value).split(")")[-1]
