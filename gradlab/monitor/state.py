"""What a monitor store holds besides its steps: the parameters θ₀ it measures distances from, and the attrs
that say how its numbers were made."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("gradlab.monitor.monitor")


def initial_parameters(group: Any, params: dict[str, Tensor]) -> list[Tensor]:
    """θ₀ per tensor: read from the store's ``init`` group (a resumed store), or the current parameters, saved
    there (a new store; dtypes other than float32/float64 are saved as float32)."""
    if "init" in group:
        init = group["init"]
        return [torch.as_tensor(np.asarray(init[n][...])).to(p.device, p.dtype).reshape(p.shape)
                for n, p in params.items()]
    theta0 = [p.detach().clone() for p in params.values()]
    init = group.create_group("init", attributes={"long_name": "parameters θ₀ at the monitor's creation"})
    for n, p in params.items():
        values = p.detach().reshape(-1).cpu()
        if values.dtype not in (torch.float64, torch.float32):
            values = values.float()
        arr = init.create_array(n, shape=(p.numel(),), dtype=values.numpy().dtype, chunks=(max(p.numel(), 1),))
        arr[...] = values.numpy()
    return theta0


def store_attrs(task: dict[str, Any], estimator: str, every: int, reduction: str, pool_size: int | None,
                ema_decay: float, level: float, fallback: list[str], notes: list[str]) -> dict[str, Any]:
    """The root attrs of a monitor store: the task, the estimator, the sampling model, the smoothing, the
    interval, the parameters measured by torch.func (fallback) and the notes."""
    return {
        "task": task, "estimator": estimator, "every": every, "reduction": reduction,
        "sampling": ("with replacement (i.i.d. examples)" if pool_size is None else
                     f"without replacement from a pool of {pool_size} examples (Σ with 1/n)"),
        "smoothing": (f"exponential moving averages, decay {ema_decay} per recorded step, weights normalised "
                      "(bias-corrected); b_noise = EMA(trace_cov) / EMA(grad_sq_norm), not an EMA of ratios"),
        "interval": (f"{level:.0%}: t intervals for the EMAs and Fieller's interval for their ratio, variance from "
                     "the EMA-weighted spread of the per-step estimates, t quantile with n_eff − 1 degrees of "
                     "freedom; assumes the recorded steps of the window are independent draws at a slowly "
                     "moving θ (upper end inf when ‖G‖² is not distinguishable from 0)"),
        "fallback_params": fallback, "excluded_params": [], "notes": notes,
        "ema_decay": float(ema_decay), "level": float(level),
        "pool_size": -1 if pool_size is None else pool_size,
    }


GAP_REASON = "not flushed before the checkpoint was saved"


def _steps(first: int, last: int, every: int) -> str:
    return f"{first}..{last}" + (f" (every {every} steps)" if every > 1 else "")


def resume_store(store: Any, ema: Any, start_step: int, every: int, on_gap: str = "warn"
                 ) -> tuple[int, int | None]:
    """Continue ``store`` at optimizer step ``start_step`` (the restored checkpoint's): drop its steps ≥ it (noted),
    record the recorded steps that were never written before it (a gap: the monitor was not flushed when the
    checkpoint was saved; ``on_gap="raise"`` refuses instead, before anything is written), replay the moving
    averages over the kept steps (the same float operations as an uninterrupted run).  Returns (the next step, the
    examples seen so far, None where the store cannot tell: not flushed at ``start_step`` and steps before it
    not written or not recorded)."""
    from gradlab.errors import UsageError

    steps = store.read("step")
    keep = int(np.searchsorted(steps, start_step, side="left"))
    if store.created:  # a new store for a training resumed at start_step: its first step is that one
        first = start_step
    else:
        first = int(store.json_attr("first_step", 0))
    expected = int(steps[keep - 1]) + every if keep else -(-first // every) * every  # the next step to record
    missing = ((start_step - 1) // every) * every  # the last recorded step before start_step
    gap = None
    if expected < start_step and expected <= missing:
        ends = f"the store ends at step {int(steps[keep - 1])}" if keep else "the store holds no step"
        gap = (f"{ends} but training resumes at step {start_step}: recorded steps "
               f"{_steps(expected, missing, every)} were never written ({GAP_REASON})")
        if on_gap == "raise":
            raise UsageError(f"{store.path}: {gap}; call monitor.flush() (or save monitor.state_dict()) with each "
                             f"checkpoint, resume from a checkpoint at step ≤ {expected}, or pass on_gap='warn' "
                             "to continue with the gap recorded in the store")
    if store.created and start_step > 0:
        store.set_attrs({"first_step": start_step})
    if keep < steps.size:
        note = (f"resumed at step {start_step}, before the store's end: the {steps.size - keep} recorded steps "
                f"{_steps(int(steps[keep]), int(steps[-1]), every)} written after that checkpoint were dropped "
                "(recorded again from there)")
        log.info("NoiseMonitor: %s", note)
        store.add_note(note)
    store.truncate(keep)
    gaps = [g for g in store.json_attr("gaps", []) if g["first"] < start_step]
    gaps = [{**g, "last": min(g["last"], missing)} for g in gaps if gap is None or g["first"] < expected]
    if gap is not None:
        gaps.append({"first": expected, "last": missing, "every": every, "resumed_at": start_step,
                     "reason": GAP_REASON})
    if gaps != store.json_attr("gaps", []):
        store.set_attrs({"gaps": gaps})
    if gap is not None:
        note = (f"{gap}: they are missing from the store (its gaps attr); call monitor.flush() (or save "
                "monitor.state_dict()) with each checkpoint")
        log.warning("NoiseMonitor: %s", note)
        store.add_note(note)
    marks = {int(k): int(v) for k, v in store.json_attr("examples_at_step", {}).items()}
    store.set_attrs({"examples_at_step": {str(k): v for k, v in marks.items() if k <= start_step}})
    if start_step in marks:  # flushed at the checkpoint: the count includes the unrecorded steps before it
        seen: int | None = marks[start_step] if marks[start_step] >= 0 else None
    elif not keep:
        seen = 0 if start_step == 0 or store.created else None
    else:
        last = int(steps[keep - 1])
        seen = int(store.read("examples_seen")[-1]) if last == start_step - 1 else None
        seen = None if seen is not None and seen < 0 else seen
    if not keep:
        return start_step, seen
    tr = np.concatenate([store.read("trace_cov"), store.read("trace_cov_layer")], axis=1)
    g2 = np.concatenate([store.read("grad_sq_norm"), store.read("grad_sq_norm_layer")], axis=1)
    for k in range(keep):
        ema.update(tr[k], g2[k])
    return start_step, seen
