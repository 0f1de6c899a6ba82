"""The Lightning and Hugging Face callbacks (skipped where the package does not import)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from gradlab.task import cross_entropy
from .conftest import per_example_sums


def _lightning():
    try:
        import lightning.pytorch as pl
    except Exception as exc:  # noqa: BLE001 - any import failure: skip with its reason
        pytest.skip(f"lightning does not import here ({type(exc).__name__}: {exc}); "
                    "pip install --no-deps lightning lightning-utilities torchmetrics")
    return pl


def _loader(batch_size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    return x, y, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _module(pl):
    """A small LightningModule: Linear-Tanh-Linear in float64, cross-entropy, SGD lr 0.1."""
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

        def forward(self, inp):
            return self.net(inp)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module


@pytest.mark.filterwarnings("ignore")  # Lightning's own advice (workers, loggers) is not under test
def test_lightning_callback_records_every_step_exactly(tmp_path):
    pl = _lightning()
    from gradlab.monitor.lightning import NoiseMonitorCallback

    x, y, loader = _loader(batch_size=8)
    Module = _module(pl)

    torch.manual_seed(0)
    module = Module()
    s1, s2 = per_example_sums(module, cross_entropy, (x[:8], y[:8]))
    cb = NoiseMonitorCallback("cross-entropy", tmp_path / "run.zarr")
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=tmp_path)
    trainer.fit(module, loader)
    ds = xr.open_zarr(tmp_path / "run.zarr", consolidated=False)
    assert list(ds.step.values) == [0, 1, 2, 3] and (ds.lr.values == 0.1).all()
    layers = [str(v) for v in ds.layer.values]
    np.testing.assert_allclose(ds.gram_trace_layer.isel(step=0).values, [s2[n] for n in layers], rtol=1e-12)
    np.testing.assert_allclose(ds.gram_sum_layer.isel(step=0).values, [s1[n] for n in layers], rtol=1e-12)
    assert np.isfinite(ds.update_norm.values).all() and (ds.update_norm.values > 0).all()


def test_hf_trainer_callback_imports_when_transformers_is_installed():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (optional extra: pip install transformers)")
    from gradlab.monitor.hf import NoiseMonitorTrainerCallback, causal_lm_loss

    assert callable(causal_lm_loss) and NoiseMonitorTrainerCallback("x.zarr").every == 1


@pytest.mark.filterwarnings("ignore")
def test_lightning_accumulation_and_resume_from_a_checkpoint(tmp_path):
    """accumulate_grad_batches=2: each step's S₁ is of both micro-batches; fit(ckpt_path=...) continues the store
    (the callback opens it once Lightning has restored global_step)."""
    pl = _lightning()
    from gradlab.monitor.lightning import NoiseMonitorCallback

    x, y, loader = _loader(batch_size=4)
    Module = _module(pl)

    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              accumulate_grad_batches=2, default_root_dir=tmp_path)
    torch.manual_seed(0)
    module = Module()
    s1, s2 = per_example_sums(module, cross_entropy, (x[:8], y[:8]))
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    pl.Trainer(max_epochs=1, callbacks=[NoiseMonitorCallback("cross-entropy", tmp_path / "run.zarr"), ck],
               **kw).fit(module, loader)
    ds = xr.open_zarr(tmp_path / "run.zarr", consolidated=False)
    assert list(ds.step.values) == [0, 1, 2, 3] and list(ds.batch_size.values) == [8] * 4
    layers = [str(v) for v in ds.layer.values]
    np.testing.assert_allclose(ds.gram_sum_layer.isel(step=0).values, [s1[n] for n in layers], rtol=1e-12)
    np.testing.assert_allclose(ds.gram_trace_layer.isel(step=0).values, [s2[n] for n in layers], rtol=1e-12)
    pl.Trainer(max_epochs=2, callbacks=[NoiseMonitorCallback("cross-entropy", tmp_path / "run.zarr")],
               **kw).fit(Module(), loader, ckpt_path=tmp_path / "ck" / "last.ckpt")
    ds = xr.open_zarr(tmp_path / "run.zarr", consolidated=False)
    assert list(ds.step.values) == list(range(8))
    assert list(ds.examples_seen.values) == [8 * (t + 1) for t in range(8)]


def test_callbacks_refuse_the_settings_they_set_themselves():
    from gradlab.errors import UsageError
    from gradlab.monitor.checks import refuse_managed

    _lightning()
    from gradlab.monitor.lightning import NoiseMonitorCallback

    with pytest.raises(UsageError, match=r"sets \['resume', 'start_step'\] itself .* remove them"):
        NoiseMonitorCallback("cross-entropy", "x.zarr", resume=True, start_step=3)
    refuse_managed({"every": 2, "ema_decay": 0.9}, "X", "fit")  # other kwargs pass through
