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


def resume_store(store: Any, ema: Any, start_step: int, every: int) -> tuple[int, int]:
    """Continue ``store`` at optimizer step ``start_step`` (the restored checkpoint's): drop its steps ≥ it, note
    the steps that were never flushed, replay the moving averages over the kept steps (the same float operations
    as an uninterrupted run).  Returns (the next step, the examples seen so far)."""
    steps = store.read("step")
    keep = int(np.searchsorted(steps, start_step, side="left"))
    if keep < steps.size:
        log.info("NoiseMonitor: dropping %d recorded steps ≥ %d (after the checkpoint)", steps.size - keep,
                 start_step)
    store.truncate(keep)
    marks = {int(k): int(v) for k, v in store.json_attr("examples_at_step", {}).items()}
    store.set_attrs({"examples_at_step": {str(k): v for k, v in marks.items() if k <= start_step}})
    if not keep:
        return start_step, marks.get(start_step, 0)
    last = int(steps[keep - 1])
    seen = int(store.read("examples_seen")[-1])
    if last != ((start_step - 1) // every) * every:
        note = (f"steps {last + 1}..{start_step - 1} were not in the store when training resumed at step "
                f"{start_step} (not flushed before the checkpoint): they are missing")
        log.warning("NoiseMonitor: %s", note)
        store.add_note(note)
    if start_step in marks:  # flushed at the checkpoint: the count includes the unrecorded steps before it
        seen = marks[start_step]
    elif last != start_step - 1:
        note = (f"examples_seen from step {start_step} on leaves out the examples of the unrecorded steps "
                f"{last + 1}..{start_step - 1} (the store was not flushed at step {start_step}: call "
                "monitor.flush() before saving a checkpoint)")
        log.warning("NoiseMonitor: %s", note)
        store.add_note(note)
    tr = np.concatenate([store.read("trace_cov"), store.read("trace_cov_layer")], axis=1)
    g2 = np.concatenate([store.read("grad_sq_norm"), store.read("grad_sq_norm_layer")], axis=1)
    for k in range(keep):
        ema.update(tr[k], g2[k])
    return start_step, seen
