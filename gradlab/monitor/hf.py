"""``NoiseMonitorTrainerCallback``: the noise monitor for Hugging Face ``transformers.Trainer`` (optional extra).

The Trainer computes its own (token-mean) loss, so the callback captures the inputs of each training forward pass
(a forward pre-hook) and, before each optimizer step, runs :meth:`NoiseMonitor.observe` on them with a
per-example loss: by default :func:`causal_lm_loss`, ℓᵢ = mean token cross-entropy of sequence i over its labels
≠ −100 with the labels shifted as Hugging Face causal LMs shift them (``labels[t + 1]`` is predicted at position
t).  Pass ``loss=`` for other tasks (any ``fn(model, batch) -> (B,)``; the batch is the dict the model got).
The store is flushed at every checkpoint save; resuming continues it at ``state.global_step``.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[NoiseMonitorTrainerCallback("run.zarr", every=8)])
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

from gradlab.monitor.checks import refuse_managed
from gradlab.monitor.monitor import NoiseMonitor
from gradlab.task import PerExampleLoss

_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "inputs_embeds")


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """ℓᵢ = mean over the scored tokens of sequence i of the next-token cross-entropy (HF label shift)."""
    labels = batch["labels"]
    out = model(**{k: v for k, v in batch.items() if k in _INPUTS})
    logits = out.logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    tok = F.cross_entropy(logits.transpose(1, 2), target.masked_fill(~keep, 0), reduction="none")
    return (tok * keep).sum(1) / keep.sum(1).clamp(min=1).to(tok.dtype)


class NoiseMonitorTrainerCallback(TrainerCallback):
    """Record the gradient noise scale of a ``Trainer`` run into ``path`` (kwargs go to :class:`NoiseMonitor`)."""

    def __init__(self, path: str | os.PathLike, *, loss: str | PerExampleLoss | None = None, every: int = 1,
                 **monitor_kwargs: Any) -> None:
        refuse_managed(monitor_kwargs, "NoiseMonitorTrainerCallback", "train(resume_from_checkpoint=...)")
        self.path, self.loss, self.every, self.kwargs = path, loss or causal_lm_loss, every, monitor_kwargs
        self.monitor: NoiseMonitor | None = None
        self._batches: list[dict[str, Any]] = []
        self._handle: Any = None
        self._observing = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)
        start = int(state.global_step)
        self.monitor = NoiseMonitor(model, self.loss, self.path, optimizer=opt, every=self.every,
                                    resume=start > 0, start_step=start if start > 0 else None, **self.kwargs)
        self._handle = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        if module.training and not self._observing and torch.is_grad_enabled() and isinstance(labels, Tensor):
            # the per-example tensors only: the Trainer also passes scalars such as ``num_items_in_batch``
            n = labels.shape[0]
            self._batches.append({k: v.detach() for k, v in kwargs.items()
                                  if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n})

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self._observing = True
        try:
            for batch in self._batches:
                self.monitor.observe(batch)
        finally:
            self._observing = False
            self._batches = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
