"""Resolve and validate a ``gradlab cbs`` config into a :class:`~gradlab.cbs.job.CbsJob`; nothing is written.

Every check runs here, before the runner creates a store: unknown names, batch sizes larger than the training
set, a budget smaller than the largest batch size or not divisible by every batch size, learning rates,
momentum, the checkpoints (load, finite weights, one architecture, a recipe naming the optimizer and rate, or
the flags that override it), data with a held-out split, dropout (branches must be reproducible).  Each problem
is one :class:`~gradlab.errors.UsageError` naming the fix.
"""

from __future__ import annotations

import logging

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.cbs.job import (ENGINES, LR_SCALINGS, OPTIMIZERS, BranchPoint, CbsJob, identity_of,
                             tokens_per_example)
from gradlab.checkpoint_set import load_checkpoint_set, refuse_dropout
from gradlab.errors import UsageError

DEFAULT_BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
DEFAULT_EVAL_EXAMPLES = 1024

log = logging.getLogger(__name__)


def _finite(name: str, v: float, *, low: float | None = None, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UsageError(f"{name} must be a finite number, got {v!r}")
    if low is not None and (v <= low if strict else v < low):
        raise UsageError(f"{name} must be {'>' if strict else '>='} {low:g}, got {v!r}")
    return float(v)


def _int(name: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def _single_value_batch_norm(net: Any, loss_fn: Any, batch: Any, sizes: Sequence[int], dtype: Any) -> list[int]:
    """The batch sizes at which the model's train-mode batch norm fails ("Expected more than 1 value per channel
    when training": ``BatchNorm1d`` on one example, or a ghost batch norm's last virtual batch of one), tried on a
    copy in train mode on the first examples; [] for a model without batch norm."""
    import copy

    import torch
    from torch import nn

    from gradlab.task import index_batch, to_run

    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             or hasattr(m, "ghost_batch_size")]
    if not norms:
        return []
    ghosts = [int(m.ghost_batch_size) for m in norms if isinstance(getattr(m, "ghost_batch_size", None), int)]
    suspects = [m for m in sizes if m == 1 or any(m > g and m % g == 1 for g in ghosts)]
    if not suspects:
        return []
    model = copy.deepcopy(net).to(dtype=dtype).train()
    failing = []
    for m in suspects:
        try:
            with torch.no_grad():
                loss_fn(model, to_run(index_batch(batch, torch.arange(m)), dtype=dtype))
        except ValueError as exc:
            if "more than 1 value per channel" in str(exc):
                failing.append(m)
        except Exception:  # noqa: BLE001 - any other failure is check_task's to report
            pass
    return failing


def resolve_cbs(
    checkpoints: Sequence[str],
    *,
    data: str,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    budget: int | None = 4096,
    budget_tokens: int | None = None,
    lr_scaling: str = "constant",
    lr_factors: Sequence[float] = (1.0,),
    seeds: int = 4,
    seed: int = 0,
    lr: float | None = None,
    base_batch_size: int | None = None,
    optimizer: str | None = None,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    n_evals: int = 32,
    eval_examples: int | None = None,
    dtype: str = "float32",
    engine: str = "auto",
    diverge_factor: float = 10.0,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    loss: str | None = None,
    collate: str | None = None,
) -> CbsJob:
    """Check every input and return the job; see the module docs.  ``lr``/``base_batch_size``/``optimizer``/
    ``momentum`` override the checkpoints' recipes (None: from each checkpoint's meta).  ``budget_tokens`` gives the
    budget in tokens instead (language modelling: tokens = examples × labelled positions per example).
    ``eval_examples`` (None: min(1024, the training set)) may not exceed the training set."""
    import torch

    from gradlab.checkpoint import checkpoint_sha256
    from gradlab.datasets import load_data
    from gradlab.task import check_task, loss_name, resolve_loss

    if lr_scaling not in LR_SCALINGS:
        raise UsageError(f"unknown --lr-scaling {lr_scaling!r}; choose one of {list(LR_SCALINGS)}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if dtype not in ("float32", "float64"):
        raise UsageError(f"--dtype must be float32 or float64, got {dtype!r}")
    if not checkpoints:
        raise UsageError("no checkpoint given; pass --checkpoint PATH (repeatable, or LABEL=PATH)")
    sizes = [int(m) if isinstance(m, (int, np.integer)) and not isinstance(m, bool) else 0 for m in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if len(set(sizes)) != len(sizes):
        raise UsageError(f"batch sizes repeat: {sizes}; give each once")
    if len(sizes) < 2:
        raise UsageError(f"one batch size ({sizes[0]}) gives nothing to compare: both estimators compare batch sizes "
                         "with the smallest; give at least two, e.g. --batch-sizes 8,16,32,64")
    sizes.sort()
    if budget_tokens is not None:
        budget_tokens = _int("--budget-tokens", budget_tokens, 1)
    else:
        budget = _int("--budget", budget, 1)
    seeds = _int("--seeds", seeds, 1)
    seed = _int("--seed", seed, 0)
    factors = [_finite("--lr-factors", f, low=0.0, strict=True) for f in lr_factors]
    if not factors or len(set(factors)) != len(factors):
        raise UsageError(f"--lr-factors must be distinct positive numbers, got {list(lr_factors)}")
    n_evals = _int("--evals", n_evals, 1)
    if eval_examples is not None:
        eval_examples = _int("--eval-examples", eval_examples, 1)
    weight_decay = _finite("--weight-decay", weight_decay, low=0.0)
    diverge_factor = _finite("--diverge-factor", diverge_factor, low=1.0, strict=True)
    if lr is not None:
        lr = _finite("--lr", lr, low=0.0, strict=True)
    if base_batch_size is not None:
        base_batch_size = _int("--base-batch-size", base_batch_size, 1)
    if momentum is not None:
        momentum = _finite("--momentum", momentum, low=0.0)
        if momentum >= 1:
            raise UsageError(f"--momentum must be below 1, got {momentum}")

    if loss is not None:
        resolve_loss(loss)
    bundle = load_data(data, collate=collate)
    loss = loss_name(loss or bundle.loss)
    loss_fn = resolve_loss(loss)
    n = len(bundle.train)
    tpe = tokens_per_example(bundle, loss)
    if budget_tokens is not None and loss != "lm":
        raise UsageError(f"--budget-tokens needs a language-modelling task (loss 'lm'); {data!r} is trained with the "
                         f"{loss} loss, where an example is not a run of tokens: give the budget in examples with "
                         "--budget")
    if budget_tokens is not None:  # the data decides how many tokens an example holds
        if budget_tokens % tpe:
            raise UsageError(f"--budget-tokens {budget_tokens} is not a multiple of the {tpe} tokens per example of "
                             f"{data!r}; give a multiple of {tpe}")
        budget = budget_tokens // tpe
    assert budget is not None
    if budget < sizes[-1]:
        raise UsageError(f"the budget of {budget} examples is smaller than the largest batch size {sizes[-1]}: every "
                         f"branch takes budget/m steps; raise --budget to at least {sizes[-1]} or drop the larger "
                         "batch sizes")
    bad = [m for m in sizes if budget % m]
    if bad:
        raise UsageError(f"batch sizes {bad} do not divide the budget of {budget} examples: every branch sees exactly "
                         "the budget; pick divisors of the budget (e.g. powers of two)")
    big = [m for m in sizes if m > n]
    if big:
        raise UsageError(f"batch sizes {big} are larger than the {n} training examples of {data!r}; use batch "
                         f"sizes <= {n}")
    if eval_examples is None:  # the default: 1024 fixed training examples, or all of a smaller training set
        eval_examples = min(DEFAULT_EVAL_EXAMPLES, n)
    elif eval_examples > n:  # asked for more than there are: refused, not quietly capped
        raise UsageError(f"--eval-examples {eval_examples} is more than the {n} training examples of {data!r}; give "
                         f"at most {n} (or leave it out: the default is min({DEFAULT_EVAL_EXAMPLES}, the training "
                         "set))")
    if bundle.test is None or len(bundle.test) == 0:
        raise UsageError(f"{data!r} has no held-out split; cbs records held-out losses: give data with a test split "
                         "(a factory returning {'train': ..., 'test': ...})")

    points: list[BranchPoint] = []
    for i, label, path, ckpt, net in load_checkpoint_set(checkpoints, model=model, model_kwargs=model_kwargs,
                                                         bundle=bundle, what="branch"):
        if i == 0:
            refuse_dropout(net, "branches must be reproducible: build it with dropout 0")
            check_task(net, loss_fn, bundle.train, name=loss, dtype=getattr(torch, dtype))
            single = _single_value_batch_norm(net, loss_fn, bundle.train.batch, sizes, getattr(torch, dtype))
            if single:
                raise UsageError(f"the model's batch norm runs in train mode while a branch trains and needs at least 2 "
                                 f"examples per batch: batch size {single[0]} gives it one value per channel; drop "
                                 "it from --batch-sizes (or use a model without batch norm)")
        meta = ckpt.meta or {}
        opt = optimizer or meta.get("optimizer")
        mom = momentum if momentum is not None else float(meta.get("momentum") or 0.0)
        eta = lr if lr is not None else meta.get("lr_applied")
        m_c = base_batch_size or meta.get("batch_size")
        missing = []  # every missing part of the recipe in one message, not one per run
        if opt not in OPTIMIZERS:
            missing.append(("no optimizer", "--optimizer sgd|adam"))
        if not isinstance(eta, (int, float)) or not eta > 0:
            missing.append(("no learning rate (lr_applied)", "--lr (the rate at --base-batch-size)"))
        if not isinstance(m_c, int) or m_c < 1:
            missing.append(("no training batch size", "--base-batch-size"))
        if missing:
            raise UsageError(f"{path} records {', '.join(w for w, _ in missing)} (meta {sorted(meta)}); pass "
                             + " and ".join(f for _, f in missing))
        if lr is None and meta.get("reduction") == "sum":  # η̃ of a sum-reduced run: η = η̃·m for mean reduction
            eta = float(eta) * float(meta.get("batch_size") or 1)
        epoch = meta.get("epoch")
        points.append(BranchPoint(label, str(Path(path).resolve()), checkpoint_sha256(path),
                                  float(epoch) if isinstance(epoch, (int, float)) else math.nan, str(opt), float(mom),
                                  float(eta), int(m_c),
                                  int(meta["step"]) if isinstance(meta.get("step"), int) else -1,
                                  identity_of(meta)))
    if engine == "chain":
        from gradlab.cbs.engine import supports_chain

        x = bundle.train.batch[0] if isinstance(bundle.train.batch, (tuple, list)) else bundle.train.batch
        if not supports_chain(net, loss, x):
            raise UsageError("engine 'chain' needs a chain of nn.Linear/nn.ReLU (gradlab's MLP without batch norm) "
                             "with every parameter trainable and the cross-entropy loss; use engine 'auto'")
    from gradlab.cbs.engine import zero_output_loss
    from gradlab.cbs.job import eval_subset
    from gradlab.task import index_batch, to_run

    sub = torch.as_tensor(eval_subset(seed, n, eval_examples))
    l0 = zero_output_loss(net.to(dtype=getattr(torch, dtype)), loss_fn,
                          index_batch(to_run(bundle.train.batch, dtype=getattr(torch, dtype)), sub))
    if l0 is not None:  # 7 digits: a summation order that differs in the last bit must not change the config
        l0 = float(f"{l0:.7g}")
    return CbsJob(
        checkpoints=tuple(points), data=data, model=model,
        model_kwargs_json=json.dumps(dict(model_kwargs) if model_kwargs is not None else None, sort_keys=True),
        loss=loss, collate=collate, batch_sizes=tuple(sizes), budget=budget, lr_scaling=lr_scaling,
        lr_factors=tuple(factors), seeds=seeds, seed=seed, weight_decay=weight_decay, n_evals=n_evals,
        eval_examples=eval_examples, dtype=dtype, engine=engine, diverge_factor=diverge_factor,
        input_shape=tuple(bundle.input_shape), n_classes=int(bundle.n_classes), pool_size=n,
        tokens_per_example=tpe, diverge_reference=l0)
