"""The Hugging Face Trainer callback through a real ``transformers.Trainer.train()`` (skipped without transformers).

A tiny randomly initialised GPT-2 (no hub download) in float64; the reference is an independent per-example
autograd loop: ℓᵢ = the mean next-token cross-entropy of sequence i alone (labels[t + 1] predicted at t, as Hugging
Face shifts them), computed in float64 from the logits (the model's own ``.loss`` casts the logits to float32),
gᵢ = ∇ℓᵢ at the parameters the step started from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

N, T, VOCAB, BATCH, STEPS = 16, 8, 23, 4, 4


class _Recorder(transformers.TrainerCallback):
    """θ at the start of every optimizer step and every training batch the model sees (independent of the monitor)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.thetas: list[dict[str, torch.Tensor]] = []
        self.batches: list[dict[str, torch.Tensor]] = []
        self._on = False
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self._on and module.training and torch.is_grad_enabled() and "labels" in kwargs:
            self.batches.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
            self._on = False  # the Trainer's own forward comes first; the monitor's observe() forward does not count

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self._on = True


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=T, vocab_size=VOCAB,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"  # the plain softmax attention (no fused kernel)
    return transformers.GPT2LMHeadModel(cfg).double()


def _reference(model, theta, batch):
    """(S₁, S₂) per parameter name at θ by one autograd.grad per sequence."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(theta[n])
    names = list(params)
    per = []
    for i in range(batch["input_ids"].shape[0]):
        logits = model(input_ids=batch["input_ids"][i:i + 1]).logits[0]  # (T, V) in float64
        li = torch.nn.functional.cross_entropy(logits[:-1], batch["labels"][i, 1:])  # labels[t + 1] at t
        per.append(torch.autograd.grad(li, [params[n] for n in names]))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    s1 = {n: float((sum(g[j] for g in per) ** 2).sum()) for j, n in enumerate(names)}
    s2 = {n: float(sum((g[j] ** 2).sum() for g in per)) for j, n in enumerate(names)}
    return s1, s2


@pytest.mark.filterwarnings("ignore")  # the Trainer's own advice (no GPU, deprecations) is not under test
def test_trainer_callback_records_every_step_exactly(tmp_path):
    from gradlab.monitor.estimators import noise_estimates
    from gradlab.monitor.hf import NoiseMonitorTrainerCallback

    model = _model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(N)]
    cb = NoiseMonitorTrainerCallback(tmp_path / "hf.zarr")
    rec = _Recorder(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH,
                                          max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant",
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, rec])
    trainer.train()
    assert cb.monitor is None  # closed at on_train_end

    ds = xr.open_zarr(tmp_path / "hf.zarr", consolidated=False)
    assert list(ds.step.values) == list(range(STEPS)) and len(rec.batches) == STEPS
    assert (ds.lr.values == 1e-2).all() and (ds.missing.values == 0).all()
    layers = [str(v) for v in ds.layer.values]
    assert layers == [n for n, _ in model.named_parameters()]
    for t in range(STEPS):
        s1, s2 = _reference(model, rec.thetas[t], rec.batches[t])
        np.testing.assert_allclose(ds.gram_sum_layer.isel(step=t).values, [s1[n] for n in layers], rtol=1e-10)
        np.testing.assert_allclose(ds.gram_trace_layer.isel(step=t).values, [s2[n] for n in layers], rtol=1e-10)
        g2, tr = noise_estimates(sum(s1.values()), sum(s2.values()), BATCH, BATCH)
        assert float(ds.grad_sq_norm.sel(group="all")[t]) == pytest.approx(float(g2), rel=1e-10)
        assert float(ds.trace_cov.sel(group="all")[t]) == pytest.approx(float(tr), rel=1e-10)
    assert np.isfinite(ds.update_norm.values).all() and (ds.update_norm.sel(group="all").values > 0).all()
