"""Training grids: checkpoints, run store, determinism, divergence, resume, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from gradlab.checkpoint import build_model_from, load_checkpoint
from gradlab.cli import main
from gradlab.store import open_store

TINY = ["--model", "mlp", "--model-kwargs", '{"widths": [16]}', "--data", "digits", "--no-progress"]


def _train(out, *extra):
    return main(["train", *TINY, "--out", str(out), *extra])


def test_grid_writes_checkpoints_and_store(tmp_path):
    assert _train(tmp_path / "r", "--batch-sizes", "32,256", "--lr", "0.05,0.1", "--epochs", "3",
                  "--checkpoint-epochs", "1,3") == 0
    ds = open_store(tmp_path / "r" / "train.zarr", kind="train")
    assert ds.sizes["run"] == 4 and ds.done.values.all()
    assert sorted(ds.batch_size.values.tolist()) == [32, 32, 256, 256]
    assert np.isfinite(ds.test_acc.values).all() and (ds.diverged_epoch.values == -1).all()
    for v in ds.data_vars.values():
        assert "long_name" in v.attrs and "units" in v.attrs
    run = ds.run_dir.values[0]
    files = sorted(p.name for p in (tmp_path / "r" / run).iterdir())
    assert files == ["epoch000.pt", "epoch001.pt", "epoch003.pt", "monitor.zarr"]  # the monitor is on by default
    ck = load_checkpoint(tmp_path / "r" / run / "epoch003.pt")
    assert ck.meta["epoch"] == 3 and ck.meta["optimizer"] == "sgd" and ck.meta["lr_rule"]["scaling"] == "constant"
    net = build_model_from(ck)
    # the recorded distance from init matches the checkpoints
    init = load_checkpoint(tmp_path / "r" / run / "epoch000.pt").state_dict
    d = sum(float(((net.state_dict()[k] - init[k]).double() ** 2).sum()) for k in init) ** 0.5
    assert d == pytest.approx(float(ds.dist_init.sel(run=ds.run.values[0], epoch=3, group="all")), rel=1e-6)
    w, w0 = net.state_dict()["layers.0.weight"].double().flatten(), init["layers.0.weight"].double().flatten()
    cos = float(w @ w0 / (w.norm() * w0.norm()))
    assert cos == pytest.approx(float(ds.cos_init_layer.isel(run=0).sel(epoch=3, layer="layers.0.weight")), rel=1e-9)
    np.testing.assert_allclose(ds.cos_init_layer.sel(epoch=0).values, 1.0)
    # the same seed gives the same init for every batch size and lr
    inits = [load_checkpoint(tmp_path / "r" / r / "epoch000.pt").state_dict for r in ds.run_dir.values]
    assert all(torch.equal(inits[0][k], i[k]) for i in inits[1:] for k in i)


def test_training_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for name in ("a", "b"):
        assert _train(tmp_path / name, "--batch-sizes", "64", "--epochs", "2", "--checkpoint-epochs", "2",
                      "--optimizer", "sgd,adam", "--momentum", "0.9") == 0
    assert torch.equal(before, torch.random.get_rng_state())
    a, b = (open_store(tmp_path / n / "train.zarr") for n in ("a", "b"))
    np.testing.assert_array_equal(a.train_loss.values, b.train_loss.values)
    for run in a.run_dir.values:
        sa = load_checkpoint(tmp_path / "a" / run / "epoch002.pt").state_dict
        sb = load_checkpoint(tmp_path / "b" / run / "epoch002.pt").state_dict
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diverging_run_is_recorded_and_grid_goes_on(tmp_path):
    assert _train(tmp_path / "r", "--batch-sizes", "32", "--lr", "1e30,0.05", "--epochs", "3",
                  "--checkpoint-epochs", "3") == 0
    ds = open_store(tmp_path / "r" / "train.zarr")
    div = dict(zip(ds.lr.values.tolist(), ds.diverged_epoch.values.tolist()))
    assert div[1e30] >= 1 and div[0.05] == -1 and ds.done.values.all()


def test_toml_grid_and_lr_rules(tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text('model = "mlp"\nmodel_kwargs = {widths = [8], batch_norm = true}\ndata = "digits"\nbatch_sizes = [16, 64]\n'
                   'lrs = [0.01]\nepochs = 2\ncheckpoint_epochs = [2]\nlr_scaling = "linear"\nbase_batch_size = 16\n'
                   'warmup_epochs = 1\nghost_batch_size = 8\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    ds = open_store(tmp_path / "r" / "train.zarr")
    lr_last = dict(zip(ds.batch_size.values.tolist(), ds.lr_used.isel(epoch=-1).values.tolist()))
    assert lr_last[16] == pytest.approx(0.01) and lr_last[64] == pytest.approx(0.04)
    ck = load_checkpoint(tmp_path / "r" / ds.run_dir.values[0] / "epoch002.pt")
    assert ck.recipe.kwargs == {"widths": [8], "batch_norm": True, "ghost_batch_size": 8}
    build_model_from(ck)


@pytest.mark.parametrize("args,msg", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--data", "nope"], "unknown dataset 'nope'"),
    (["--batch-sizes", "0"], "batch size 0 is invalid"),
    (["--batch-sizes", "5000"], "larger than the 1438 training examples"),
    (["--lr", "0"], "learning rate 0.0 is invalid"),
    (["--lr", "-0.1"], "learning rate -0.1 is invalid"),
    (["--batch-sizes", ""], "the grid is empty"),
    (["--batch-sizes", "a,b"], "--batch-sizes expects a comma-separated list"),
    (["--checkpoint-epochs", "99"], "outside 0..2"),
    (["--model-kwargs", "{"], "--model-kwargs is not valid JSON"),
    (["--config", "missing.toml"], "does not exist"),
    (["--monitor-every", "-1"], "--monitor-every must be an integer ≥ 0"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, msg):
    out = tmp_path / "r"
    code = main(["train", *TINY, "--epochs", "2", "--out", str(out), *args])
    assert code == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_out_folder_with_other_data_is_refused(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "precious.txt").write_text("keep me")
    assert _train(tmp_path / "r", "--epochs", "1", "--checkpoint-epochs", "1") == 2
    assert "holds other data" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["precious.txt"]


def test_existing_run_needs_resume_and_resume_of_finished_grid_is_noop(tmp_path, capsys):
    assert _train(tmp_path / "r", "--epochs", "1", "--checkpoint-epochs", "1") == 0
    assert _train(tmp_path / "r", "--epochs", "1", "--checkpoint-epochs", "1") == 2
    assert "--resume" in capsys.readouterr().err
    assert _train(tmp_path / "r", "--epochs", "1", "--checkpoint-epochs", "1", "--resume") == 0
    assert _train(tmp_path / "r", "--epochs", "2", "--checkpoint-epochs", "1", "--resume") == 2
    assert "different config" in capsys.readouterr().err


def test_killed_grid_resumes_to_identical_results(tmp_path):
    """kill -9 after the first run is marked done; --resume finishes with the same numbers as a clean run."""
    args = [*TINY, "--batch-sizes", "16,32,64", "--epochs", "2", "--checkpoint-epochs", "2"]
    assert main(["train", *args, "--out", str(tmp_path / "clean")]) == 0
    code = ("import os, signal, gradlab.store as s\n"
            "orig = s.StoreWriter.mark_done\n"
            "def mark(self, region):\n"
            "    orig(self, region)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "s.StoreWriter.mark_done = mark\n"
            "from gradlab.cli import main\n"
            f"main(['train', *{args!r}, '--out', {str(tmp_path / 'crash')!r}])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    half = open_store(tmp_path / "crash" / "train.zarr")
    assert half.done.values.tolist() == [True, False, False]
    assert _train(tmp_path / "crash", *args[len(TINY):], "--resume") == 0
    a, b = (open_store(tmp_path / n / "train.zarr") for n in ("clean", "crash"))
    for name in ("train_loss", "test_acc", "dist_init_layer", "dist_origin"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


# ---- train-mode batch norm and a batch of one example; a user forward that raises --------------------------------

BN = ["--model", "mlp", "--model-kwargs", '{"widths": [16], "batch_norm": true}', "--data", "digits", "--no-progress",
      "--monitor-every", "0", "--epochs", "1", "--checkpoint-epochs", "1", "--lr", "0.05"]


@pytest.mark.parametrize(("extra", "size"), [(["--batch-sizes", "1,32"], 1),
                                             (["--batch-sizes", "33", "--ghost-batch-size", "32"], 33)])
def test_batch_norm_with_a_batch_of_one_is_refused_in_one_line(tmp_path, capsys, extra, size):
    out = tmp_path / "r"
    assert main(["train", *BN, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gradlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "batch norm in train mode needs at least 2 examples per batch" in lines[0]
    assert f"batch size {size} in --batch-sizes" in lines[0]
    assert not out.exists()


def test_a_last_batch_of_one_example_is_left_out_for_batch_norm_and_said_once(tmp_path, caplog):
    """1438 digits at batch size 479: three full batches and one example, which batch norm cannot normalise: that
    example of each epoch's shuffle is left out (drop_last), the rest is the same training as ever."""
    from gradlab.datasets import load_data
    from gradlab.probe.step import minibatch_loss
    from gradlab.task import cross_entropy
    from gradlab.train import TrainConfig, _torch_seed, init_model

    out = tmp_path / "r"
    assert main(["train", *BN, "--out", str(out), "--batch-sizes", "479"]) == 0
    said = [r.getMessage() for r in caplog.records if "left out (like drop_last)" in r.getMessage()]
    assert len(said) == 1 and "batch size 479" in said[0]
    ds = open_store(out / "train.zarr")
    assert ds.attrs["dropped_last_batch"] == [479] and np.isfinite(ds.train_loss.values).all()
    run = out / "runs" / ds.run.values[0]
    ck = load_checkpoint(run / "epoch001.pt")
    assert ck.meta["step"] == 3

    cfg = TrainConfig(model="mlp", model_kwargs={"widths": [16], "batch_norm": True}, data="digits",
                      batch_sizes=(479,), lrs=(0.05,), epochs=1, monitor_every=0)
    data = load_data("digits")
    net = init_model(cfg, data, 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    perm = torch.randperm(1438, generator=torch.Generator().manual_seed(_torch_seed(0, 1, 479)))
    net.train()
    for k in range(3):
        opt.zero_grad(set_to_none=True)
        minibatch_loss(net, data.train[perm[k * 479:(k + 1) * 479]], cross_entropy, "mean").backward()
        opt.step()
    for name, value in net.state_dict().items():
        assert torch.equal(value, ck.state_dict[name]), name


def test_a_user_forward_raising_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    import textwrap

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pickymod.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Picky(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Linear(4, 3)
            def forward(self, x):
                if x.shape[0] == 5:
                    raise RuntimeError("picky forward refuses batches of five")
                return self.net(x)

        def picky():
            return Picky()

        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(20, 4, generator=g)
            return x, x[:, :3].argmax(1)
    '''))
    sys.modules.pop("pickymod", None)
    out = tmp_path / "r"
    assert main(["train", "--model", "pickymod:picky", "--data", "pickymod:data", "--batch-sizes", "5", "--epochs",
                 "1", "--monitor-every", "0", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gradlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "RuntimeError: picky forward refuses batches of five" in lines[0] and "pickymod.py" in lines[0]
    assert not (out / "train.zarr").exists()
