"""One training run: a fresh model trained for ``epochs`` epochs under a learning-rate rule, with per-epoch
train/test loss and accuracy, the learning rate applied, and where the weights went (distance from init per tensor
and group, cosine to init, distance from the origin: :mod:`gradlab.probe.distance`, the one implementation that
probe stores use too), and checkpoints at init and at the checkpoint epochs.

Determinism: run r with seed s initialises its model from ``SeedSequence([s, 0])`` and shuffles with
``SeedSequence([s, 1, m])``; the global RNG is forked, never changed.  The last, smaller minibatch of an epoch is
kept (every example is seen once per epoch), unless the model's train-mode batch norm cannot normalise it (a single
example): then it is left out, like ``drop_last`` (:func:`gradlab.train.dropped_last_batches`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradlab.checkpoint import save_checkpoint
from gradlab.curvature.evaluate import evaluate
from gradlab.datasets import DataBundle, Split
from gradlab.schema import GROUPS
from gradlab.task import resolve_loss, to_run
from gradlab.train import (RunSpec, TrainConfig, _torch_seed, checkpoint_epochs, dropped_last_batches, init_model,
                           recipe_for, rule_for)

log = logging.getLogger(__name__)


def with_dtype(data: DataBundle, dtype: torch.dtype) -> DataBundle:
    """The bundle with its floating tensors in ``dtype`` (integer tensors untouched): only on the user's request."""
    import dataclasses

    move = lambda split: Split(to_run(split.batch, dtype=dtype)) if split is not None else None  # noqa: E731
    return dataclasses.replace(data, train=move(data.train), test=move(data.test))


def layer_kinds(model: nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names and their kinds (``weight``/``bias``: :func:`gradlab.probe.distance.param_kind`)."""
    from gradlab.probe.distance import param_kind

    names = [n for n, _ in model.named_parameters()]
    return names, [param_kind(n) for n in names]


def distances(model: nn.Module, init: dict[str, torch.Tensor]) -> tuple[np.ndarray, ...]:
    """Per tensor ‖θ − θ₀‖ and cos(θ, θ₀); per group (all/weight/bias) ‖θ − θ₀‖ and ‖θ‖
    (:func:`gradlab.probe.distance.distances`)."""
    from gradlab.probe.distance import distances as shared

    names = [n for n, _ in model.named_parameters()]
    d = shared(dict(model.named_parameters()), init, names)
    return d.dist_init_layer, d.cos_init_layer, d.dist_init, d.dist_origin


def train_run(cfg: TrainConfig, data: DataBundle, spec: RunSpec, run_dir: Path,
              tick: Callable[[int], Any] = lambda n=1: None) -> dict[str, np.ndarray]:
    """Train one run; returns per-epoch arrays.  Checkpoints go to ``run_dir/epoch{e:03d}.{pt|safetensors}``;
    ``tick(1)`` is called after every epoch (the progress bar)."""
    from gradlab.probe.step import minibatch_loss

    loss_fn = resolve_loss(cfg.loss or data.loss)
    model = init_model(cfg, data, spec.seed)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = rule_for(cfg, spec)
    if spec.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=rule.lr_at(0, 1), momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=rule.lr_at(0, 1), weight_decay=cfg.weight_decay)
    recipe = recipe_for(cfg, data)
    mon = None
    if cfg.monitor_every:
        from gradlab.monitor import attach_for_train

        mon = attach_for_train(model, opt, loss_fn, run_dir / "monitor.zarr", every=cfg.monitor_every,
                               pool_size=len(data.train), reduction=rule.reduction, resume=True, start_step=0,
                               config={"run": spec.name, "seed": spec.seed, "batch_size": spec.batch_size,
                                       "lr": spec.lr, "optimizer": spec.optimizer})
    gen = torch.Generator().manual_seed(_torch_seed(spec.seed, 1, spec.batch_size))
    n, m, epochs = len(data.train), spec.batch_size, cfg.epochs
    # a final batch the model's train-mode batch norm cannot normalise (one example) is left out, like drop_last
    used = n - n % m if m in dropped_last_batches(cfg, data, model) else n
    steps_per_epoch = math.ceil(used / m)
    n_layers = len(init)
    out = {k: np.full(epochs + 1, np.nan) for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr_used")}
    out["dist_init_layer"] = np.full((epochs + 1, n_layers), np.nan)
    out["cos_init_layer"] = np.full((epochs + 1, n_layers), np.nan)
    out["dist_init"] = np.full((epochs + 1, len(GROUPS)), np.nan)
    out["dist_origin"] = np.full((epochs + 1, len(GROUPS)), np.nan)
    out["diverged_epoch"] = np.array(-1)
    suffix = "safetensors" if cfg.checkpoint_format == "safetensors" else "pt"

    def record(epoch: int) -> bool:
        tl, ta = evaluate(model, data.train.batch, loss=loss_fn, dtype=None, device=None, chunk_size=2048)
        out["train_loss"][epoch], out["train_acc"][epoch] = tl, ta
        if data.test is not None:
            out["test_loss"][epoch], out["test_acc"][epoch] = evaluate(model, data.test.batch, loss=loss_fn,
                                                                       dtype=None, device=None, chunk_size=2048)
        (out["dist_init_layer"][epoch], out["cos_init_layer"][epoch], out["dist_init"][epoch],
         out["dist_origin"][epoch]) = distances(model, init)
        if epoch == 0 or epoch in checkpoint_epochs(cfg):
            meta = {"dataset": data.name, "epoch": epoch, "step": epoch * steps_per_epoch, "batch_size": m,
                    "lr": spec.lr, "lr_rule": rule.describe(), "optimizer": spec.optimizer,
                    # the rate of the last step taken (of step 0 at init), as the optimiser applied it
                    "lr_applied": rule.lr_at(max(epoch * steps_per_epoch - 1, 0), steps_per_epoch),
                    "reduction": rule.reduction,
                    "momentum": cfg.momentum, "seed": spec.seed, "tag": "init" if epoch == 0 else f"epoch{epoch}",
                    "run": spec.name}
            if mon is not None:
                mon.flush()
            save_checkpoint(run_dir / f"epoch{epoch:03d}.{suffix}", model, recipe, meta)
        return math.isfinite(tl)

    try:
        record(0)
        step = 0
        model.train()
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(n, generator=gen)
            finite = True
            for start in range(0, used, m):
                idx = perm[start:start + m]
                lr = rule.lr_at(step, steps_per_epoch)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                batch = data.train[idx]
                loss = mon.loss(batch) if mon is not None else minibatch_loss(model, batch, loss_fn, rule.reduction)
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                opt.step()
                step += 1
            out["lr_used"][epoch] = rule.lr_at(max(step - 1, 0), steps_per_epoch)
            if not finite or not record(epoch):
                out["diverged_epoch"] = np.array(epoch)
                log.warning("run %s diverged at epoch %d (non-finite loss); recorded and skipped", spec.name, epoch)
                break
            tick(1)
    finally:
        if mon is not None:
            mon.close()
    return out
