"""``NoiseMonitor``: the gradient noise scale of every (or every K-th) training step, recorded into a zarr store.

Plain loop (the monitor hooks the backward pass you run; nothing is recomputed)::

    monitor = NoiseMonitor(model, "cross-entropy", "run.zarr", optimizer=opt)
    for x, y in loader:
        opt.zero_grad()
        monitor.loss((x, y)).backward()     # mean of the per-example losses ℓᵢ = fn(model, batch)
        opt.step()                          # the monitor records this step (an optimizer step hook)
    monitor.close()

For loops you cannot change, ``monitor.observe(batch)`` runs its own forward/backward on the batch (with
``torch.autograd.grad``: the model's ``.grad`` is not touched) -- one more forward/backward per recorded step.
Without ``optimizer=`` call ``monitor.step()`` after each backward, before the parameters change (no learning
rate or update norm is recorded then, and ``dist_init`` is ‖θ_t − θ₀‖ at the step's start: noted in the store).
The user must zero the gradients before each step's backward (S₁ is read from ``.grad``): a ``.grad`` still
holding the last step's (the same tensor at the version the optimizer step left) is found at every recorded
step, which is then ``missing`` 6; a backward whose gradients are zeroed with no optimizer step after it (a
GradScaler skipping a step) is dropped with a note.  Examples must not interact (no batch norm in training mode:
noted in the store); a forward that draws random numbers (dropout) excludes the torch.func fallback's
parameters, whose re-run would draw others.
Backpropagate ``monitor.loss(batch)`` alone (scaled as you like): a penalty added to it (λ‖θ‖²; use the optimizer's
weight decay instead) puts its gradient in ``.grad``; the first recorded step finds that (the hooked Linear layers'
Σᵢ wᵢgᵢ against ``.grad``) and no step is then estimated (``missing`` 6, with a note).  Changing ``.grad`` by one
common factor before the step (``clip_grad_norm_``, a GradScaler's unscaling) is fine: S₁ and the per-example norms
are read during the backward, and divided by the weights wᵢ, which carry any loss scale
(:func:`gradlab.monitor.checks.extra_loss_terms`).
Gradient accumulation: call ``monitor.loss(micro_batch)`` for each micro-batch before the optimizer step; the
per-example estimator pools the examples of all micro-batches, the two-batch estimator
(``estimator="two-batch"``, McCandlish et al. 2018, App. A) uses the micro-batch gradients instead of per-example
norms.  The estimators, their sampling model and the smoothing: :mod:`gradlab.monitor.estimators`; the store:
:mod:`gradlab.monitor.store`.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradlab.errors import UsageError
from gradlab.monitor.checks import check_arguments, extra_loss_terms, extra_terms_note
from gradlab.monitor.distances import MODES, Distances
from gradlab.monitor.estimators import EmaRatio
from gradlab.monitor.norms import PerExampleNorms, fallback_sq_norms
from gradlab.probe.distance import param_kind
from gradlab.monitor.store import GROUPS, MonitorStore
from gradlab.monitor.worker import Worker, input_marks, marks, spare_core, unchanged
from gradlab.monitor.writer import Appender
from gradlab.monitor.rows import StepCopy, chunk_rows
from gradlab.monitor.state import initial_parameters, resume_store, store_attrs
from gradlab.monitor.sums import Micro, Pending, loss_sum, step_sums
from gradlab.task import (Batch, PerExampleLoss, batch_len, check_loss_output, loss_name, resolve_loss,
                          source_sha256)

log = logging.getLogger(__name__)

#: the open monitors of this process by store path (a notebook cell run again after an error builds a new one)
_LIVE: dict[str, Any] = {}


def _close_earlier(path: str, model: nn.Module) -> None:
    """Close this process's open monitor of the same store or the same model (its lock and hooks would refuse or
    confuse the new one), saying so; one whose store folder is gone is released without writing."""
    for key, ref in list(_LIVE.items()):
        mon = ref()
        if mon is None or mon.closed:
            _LIVE.pop(key, None)
            continue
        if key != path and mon.model is not model:
            continue
        log.warning("NoiseMonitor: closing the earlier NoiseMonitor of %s in this process (%s); close() a "
                    "monitor, or use it in a with block, when its loop ends", key,
                    "the same store" if key == path else "the same model: one monitor per model")
        _LIVE.pop(key, None)
        try:
            if mon.store.path.is_dir():
                mon.close()
            else:
                mon._abandon()
        except Exception:  # noqa: BLE001 - a broken earlier monitor must not stop the new one
            mon._abandon()


def _close_at_exit() -> None:
    """At the interpreter's exit (a script's end, an uncaught exception, KeyboardInterrupt; not ``os._exit``, a
    signal's default action such as SIGTERM's, or ``kill -9``): close this process's open monitors, so that the steps
    they buffered reach their stores.  A forked child's copies are not its own: they are left alone."""
    for key, ref in list(_LIVE.items()):
        mon = ref()
        if mon is None or mon.closed or getattr(mon, "_pid", None) != os.getpid():
            continue
        if getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None:
            mon._raised = True  # exiting on an uncaught exception: that, not the optimizer, stopped the loop
        try:
            if mon.store.path.is_dir():
                mon.close()
                log.info("NoiseMonitor: closed the monitor of %s at exit (call close(), or use a with block)", key)
            else:
                mon._abandon()
        except Exception as exc:  # noqa: BLE001 - one monitor's failure must not stop the others
            log.warning("NoiseMonitor: could not close the monitor of %s at exit (%s: %s)", key,
                        type(exc).__name__, exc)


atexit.register(_close_at_exit)


def _grad_mark(grad: Tensor) -> tuple[Any, int]:
    """A weak reference to a ``.grad`` tensor and its version: whether it is still that tensor, unmodified."""
    return weakref.ref(grad), grad._version


def _rng_states(params: dict[str, Tensor]) -> list[Tensor]:
    """The CPU generator's state and, for parameters on CUDA, that device's (to see whether a forward drew)."""
    states = [torch.get_rng_state()]
    devices = {p.device for p in params.values() if p.device.type == "cuda"}
    states += [torch.cuda.get_rng_state(d) for d in sorted(devices, key=str)]
    return states


def _sqnorm(t: Tensor) -> Tensor:
    """‖t‖² without a temporary (a dot product of the flattened tensor with itself)."""
    v = t.reshape(-1)
    return torch.dot(v, v)


class NoiseMonitor:
    """Records per step ‖G‖², tr Σ, B_simple and the smoothed B_noise (overall, weights, biases, per tensor).

    Parameters: ``model``; ``loss`` a per-example loss ``fn(model, batch) -> (B,)`` or a built-in name
    (``gradlab.task.resolve_loss``); ``path`` the zarr store (created; refused if it holds anything else unless
    ``resume``); ``optimizer`` (optional: step hooks record the learning rate, the update norm and close each
    step); ``every`` record every K-th step; ``estimator`` ``"per-example"`` or ``"two-batch"``; ``reduction`` of
    the loss :meth:`loss` returns (``"mean"`` or ``"sum"``); ``pool_size`` n for batches drawn without replacement
    from n examples (None: with replacement); ``ema_decay`` β per recorded step; ``level`` of the intervals;
    ``chunk_steps`` recorded steps per appended chunk; ``resume`` with ``start_step`` (the number of optimizer
    steps the restored checkpoint had taken): the store keeps its steps < start_step and continues (steps it
    holds from start_step on are dropped, noted); ``on_gap`` what such a resume does when the store ends before
    start_step, its last steps never written (the monitor was not flushed when the checkpoint was saved: call
    ``monitor.flush()``, or save ``monitor.state_dict()``, with each checkpoint): ``"warn"`` continues with the gap
    recorded in the store (``gaps`` attr, a note, a warning), ``"raise"`` refuses with a UsageError; ``config``
    extra JSON-safe settings recorded in the store (seeds, data, ...); ``distances=False`` skips the update norm
    and the distance from init (each costs a few passes over the parameters per recorded step: the largest part of
    the monitor's cost on memory-bound CPUs; they are then recorded as NaN); ``distances="optimizer"`` takes the
    update norm of a ``torch.optim.SGD`` from its own update, without a snapshot of θ
    (:mod:`gradlab.monitor.distances`); ``background`` computes each recorded step's numbers on a worker thread
    while training goes on (the same numbers; None: when the parameters are on the CPU, torch's threads leave a
    core free and ``optimizer=`` is given, whose next step waits for the worker; :mod:`gradlab.monitor.worker`;
    ``False`` in a loop that edits parameters or input buffers through ``.data`` between steps); ``examples_seen``
    the examples the training had seen before the monitor's first step (a resumed checkpoint's count: a resume
    whose store was not flushed at ``start_step`` cannot tell it, and records ``examples_seen`` as -1, noted,
    unless it is given; ``state_dict()`` carries it).
    """

    def __init__(self, model: nn.Module, loss: str | PerExampleLoss, path: str | os.PathLike, *,
                 optimizer: torch.optim.Optimizer | None = None, every: int = 1, estimator: str = "per-example",
                 reduction: str = "mean", pool_size: int | None = None, ema_decay: float = 0.95,
                 level: float = 0.95, chunk_steps: int = 128, resume: bool = False, start_step: int | None = None,
                 on_gap: str = "warn", distances: bool = True, background: bool | None = None,
                 config: Mapping[str, Any] | None = None, examples_seen: int | None = None) -> None:
        check_arguments(model, loss=loss, path=path, optimizer=optimizer, every=every, estimator=estimator,
                        reduction=reduction, ema_decay=ema_decay, level=level, pool_size=pool_size,
                        chunk_steps=chunk_steps, resume=resume, start_step=start_step, config=config,
                        on_gap=on_gap)
        if examples_seen is not None and (isinstance(examples_seen, bool) or not isinstance(examples_seen, int)
                                          or examples_seen < 0):
            raise UsageError(f"examples_seen must be None or an int ≥ 0 (the examples the training had seen before "
                             f"the monitor's first step: a resumed checkpoint's), got {examples_seen!r}")
        self._key = os.path.abspath(os.fspath(path))
        _close_earlier(self._key, model)
        self.model = model
        self.loss_fn = resolve_loss(loss)
        self.every, self.estimator, self.reduction = int(every), estimator, reduction
        self.pool_size = None if pool_size is None else int(pool_size)
        self.optimizer = optimizer
        if distances not in (True, False, *MODES):
            raise UsageError(f"distances must be True, False or one of {MODES}, got {distances!r}")
        self.distances = bool(distances)
        self.update_mode = distances if isinstance(distances, str) else "realized"
        if background not in (None, True, False):
            raise UsageError(f"background must be True, False or None (automatic), got {background!r}")
        if background and optimizer is None:
            raise UsageError("background=True needs optimizer= (its next step waits for the worker before the "
                             "parameters change); pass the optimizer, or leave background at None")
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise UsageError("the model has no trainable parameters to monitor")
        names = list(self.params)
        kinds = [param_kind(n) for n in names]  # bias_ih_l0 of an LSTM is a bias too
        self.names = names
        self._group_masks = np.array([[True] * len(names), [k == "weight" for k in kinds],
                                      [k == "bias" for k in kinds]])
        self.hooks = PerExampleNorms(model) if estimator == "per-example" else None
        self.fallback = [n for n in (self.hooks.fallback if self.hooks else []) if n in self.params]
        self.excluded: list[str] = []
        interacting = [type(m).__name__ for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        notes = []
        if interacting and estimator == "per-example":
            notes.append(f"batch norm in training mode ({interacting[0]}) couples the examples of a batch: the "
                         "per-example gradients are not those of independent examples")
            log.warning("NoiseMonitor: %s", notes[-1])
        if optimizer is None and self.distances:
            notes.append("no optimizer= given: monitor.step() closes each step after its backward, before the "
                         "parameters change, so dist_init is ‖θ_t − θ₀‖ at the step's start (not θ_{t+1}), and "
                         "lr and update_norm are NaN")
        task = {"loss": loss_name(loss), "loss_source_sha256": source_sha256(self.loss_fn),
                "model": f"{type(model).__module__}.{type(model).__qualname__}",
                "model_source_sha256": source_sha256(type(model))}
        cfg = {"every": self.every, "distances": self.distances if self.update_mode == "realized" else self.update_mode, "estimator": estimator, "reduction": reduction,
               "pool_size": self.pool_size,
               "ema_decay": float(ema_decay), "level": float(level), "task": task, **dict(config or {})}
        attrs = store_attrs(task, estimator, self.every, reduction, self.pool_size, ema_decay, level, self.fallback,
                            notes)
        self.store = MonitorStore(path, layers=names, kinds=kinds, sizes=[p.numel() for p in self.params.values()],
                                  config=cfg, attrs=attrs, chunk_steps=chunk_steps, resume=resume)
        self.ema = EmaRatio(len(GROUPS) + len(names), decay=ema_decay, level=level)
        self.t = 0
        self.examples_seen = 0
        self._seen_known = True  # False: a resume whose count the store cannot give (recorded as -1)
        self._rows: list[StepCopy] = []
        self._appender = Appender(self.store.append)  # full chunks are written in the background
        try:
            self._init_state(resume, start_step, on_gap, examples_seen)
        except BaseException:
            self.store.close()
            raise
        self._pending: Pending | None = None
        self._warned_no_loss = False
        self._warned_unused = False  # a loss() call never backpropagated, said once
        self._bn_checked = bool(interacting) or estimator != "per-example"
        self._warned_codes: set[int] = set()  # missing codes 3 and 4, said once each
        self._warned_replaced = False
        self._raised = False  # the loss raised, or the process/with block ends on an exception: no "never stepped"
        self._uses_checked = False
        self._grad_marks: dict[str, tuple[Any, int]] | None = None
        self._warned_stale = False
        self._warned_unstepped = False
        self._random_forward: bool | None = None  # does the forward draw random numbers (dropout)? first step
        self._sums_check: bool | None = None  # None: not checked yet; True: the loss has other terms
        self._dist = Distances(list(self.params.values()), self.theta0, optimizer, self.update_mode)
        if background is None:
            background = (optimizer is not None and spare_core()
                          and all(p.device.type == "cpu" for p in self.params.values()))
        self._background = bool(background)
        self._worker = Worker()
        self._work: tuple[Any, ...] | None = None  # the worker's job for the last recorded step, to record
        self._warned_edit = False
        self._handles: list[Any] = []
        for name, p in self.params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_grad_hook(name)))
            if estimator == "two-batch":
                self._handles.append(p.register_hook(self._make_micro_hook(name)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))
        self.closed = False
        self._pid = os.getpid()  # closed at this process's exit (not a forked child's)
        _LIVE[self._key] = weakref.ref(self)

    # -- state: θ₀, resume ----------------------------------------------------------------------------------
    def _init_state(self, resume: bool, start_step: int | None, on_gap: str = "warn",
                    examples_seen: int | None = None) -> None:
        new = "init" not in self.store.group
        self.theta0 = initial_parameters(self.store.group, self.params)
        if new:  # the commit record lists the init group too
            self.store.commit(rescan=True)
        if examples_seen is not None:
            self.examples_seen = int(examples_seen)
        if not resume:
            return
        self.t, seen = resume_store(self.store, self.ema, int(start_step), self.every, on_gap)
        if examples_seen is not None:
            return
        if seen is not None:
            self.examples_seen = seen
            return
        self._seen_known = False
        note = (f"examples_seen from step {self.t} on is not known (recorded as -1): the store was not flushed at "
                f"step {self.t} and does not hold every step before it; pass examples_seen= (the examples the "
                "checkpoint had seen) to NoiseMonitor when resuming, and call monitor.flush() (or save "
                "monitor.state_dict()) with each checkpoint")
        log.warning("NoiseMonitor: %s", note)
        self.store.add_note(note)

    # -- the user's calls -------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> Tensor:
        """The reduced loss to backpropagate (mean or sum of ℓᵢ = fn(model, batch)), hooked for this step.

        Only what is backpropagated counts: a call under ``torch.no_grad()`` (an evaluation) is not recorded, a
        call whose loss never reaches a backward before the optimizer step (a logging call) is left out of the
        step (noted), and several calls backpropagated together (two views' losses summed) are one step's."""
        self._check_open()
        n = batch_len(batch)
        if not torch.is_grad_enabled():  # evaluation (torch.no_grad, inference_mode): nothing counted or recorded
            per = check_loss_output(self.loss_fn(self.model, batch), n, name=loss_name(self.loss_fn),
                                    need_grad=False, finite=False)
            return per.mean() if self.reduction == "mean" else per.sum()
        pending = self._start()
        if pending.grad_versions and self._grads_reset(pending):
            pending = self._drop_unstepped(pending)
        session = None
        if pending.record and self.hooks is not None:
            self._collect(pending, ready_only=True)  # the calls whose backward has run
            if not self._bn_checked:
                self._check_batch_norm()
            session = self.hooks.arm()
        try:
            per = self._per_example(batch, n)
        except BaseException:
            self._raised = True  # close() then does not blame the optimizer for the steps never taken
            raise
        if pending.record and self.hooks is not None and not self._uses_checked:
            self._check_uses(per)
        if pending.record:  # a step that is not recorded costs no tensor operation here
            micro = Micro(n, batch, loss=per.detach().sum(), calls=session)
            if not pending.micros:
                pending.marks, self._grad_marks = self._grad_marks, None
            pending.micros.append(micro)
            per.register_hook(lambda g, m=micro, p=pending: self._backward_starts(g, m, p))
        else:
            per.register_hook(lambda g, p=pending, n=n: self._count(p, n))
        return per.mean() if self.reduction == "mean" else per.sum()

    def observe(self, batch: Batch) -> None:
        """Run a forward/backward of the per-example losses on ``batch`` at the current θ and record this step.

        The model's ``.grad`` is not touched (``torch.autograd.grad``).  With ``optimizer=`` the step is closed
        by the next ``optimizer.step()``; without, at once.
        """
        self._check_open()
        if self.estimator != "per-example":
            self._raised = True  # close() then does not blame the optimizer
            raise UsageError("observe() measures per-example gradients; use estimator='per-example' (the two-batch "
                             "estimator needs the micro-batches of your own backward passes: monitor.loss())")
        pending = self._start()
        n = batch_len(batch)
        pending.batch_size += n
        pending.observed = True
        if pending.record:  # steps that are not recorded cost nothing but the count of examples
            self._collect(pending)
            session = self.hooks.arm()
            with torch.enable_grad():
                try:
                    per = self._per_example(batch, n)
                except BaseException:
                    self._raised = True
                    raise
                if not self._uses_checked:
                    self._check_uses(per)
                params = list(self.params.values())
                grads = torch.autograd.grad(per.sum(), params, allow_unused=True)
            micro = Micro(n, batch, weights=[torch.ones_like(per.detach())], loss=per.detach().sum(), calls=session)
            pending.micros.append(micro)
            self._collect(pending)
            for name, g in zip(self.params, grads):  # S₁ is of the step's summed gradient: every observed batch
                if g is not None:
                    acc = pending.observed_grads.get(name)
                    acc = g.detach() if acc is None else acc + g.detach()
                    pending.observed_grads[name] = acc
                    pending.grad_sq[name] = _sqnorm(acc)
        if self.optimizer is None:
            self._finish()

    def step(self) -> None:
        """Close the current step (loops without ``optimizer=``; with one, ``optimizer.step()`` does this)."""
        self._check_open()
        if self.optimizer is not None:
            raise UsageError("this monitor closes each step at optimizer.step() (it was given optimizer=); remove "
                             "the call to monitor.step()")
        if self._pending is not None:
            self._finish()

    def flush(self) -> None:
        """Write the buffered steps to the store now and wait until they are on disk (call before saving a
        checkpoint, or save :meth:`state_dict` with it: a checkpoint saved without it leaves a gap in the store
        on resume).

        The moving averages' estimates and intervals of all buffered steps are computed here, at once, from the
        EMA state each step left (elementwise: the same numbers as step by step).  Full chunks are appended in a
        background thread during training (:mod:`gradlab.monitor.writer`); this waits for those too."""
        self._submit()
        self._appender.wait()
        self._mark_examples()

    def state_dict(self) -> dict[str, Any]:
        """Flush (:meth:`flush`), then what a checkpoint needs to resume this store: put it in the checkpoint you
        save, and resume with ``NoiseMonitor(..., resume=True, start_step=state["step"])``.  Saving it with each
        checkpoint keeps the store and the checkpoint consistent: no step the checkpoint took is missing from
        the store on resume."""
        self._check_open()
        self.flush()
        return {"step": self.t, "examples_seen": self._seen(), "store": str(self.store.path)}

    def _seen(self) -> int:
        """The examples seen by the steps closed so far; -1 where that is not known (:meth:`_init_state`)."""
        return self.examples_seen if self._seen_known else -1

    def _mark_examples(self) -> None:
        """Record the examples seen by the steps closed so far (a resume at this step restores the count, which
        the store's rows cannot give when the last steps before it were not recorded)."""
        marks = self.store.json_attr("examples_at_step", {})
        if marks.get(str(self.t)) != self._seen():
            self.store.set_attrs({"examples_at_step": {**marks, str(self.t): self._seen()}})

    def _submit(self) -> None:
        self._wait_work()
        if self._rows:
            rows = chunk_rows(self._rows, group_masks=self._group_masks, two_batch=self.estimator == "two-batch",
                              pool_size=self.pool_size, ema=self.ema)
            self._rows = []
            self._appender.submit(rows)

    def close(self) -> None:
        """Flush, record the final attrs, remove every hook and release the store (done at the interpreter's exit
        for a monitor still open: :func:`_close_at_exit`)."""
        if getattr(self, "closed", True):
            return
        if self.t == 0 and not self._raised:  # step 0 is always recorded: no step was closed at all (not said when
            # an exception ended the loop: the optimizer did not step because of it)
            why = ("the optimizer passed (optimizer=) never stepped: is it the one that steps this model?"
                   if self.optimizer is not None else
                   "no monitor.step() call closed a step: call it after each backward, before the parameters "
                   "change, or pass optimizer=")
            log.warning("NoiseMonitor: %s recorded no step: %s", self.store.path, why)
        try:
            try:
                self._submit()
            finally:
                try:
                    self._worker.shutdown()
                finally:
                    self._appender.shutdown()
            self._mark_examples()
            self.store.set_attrs({"excluded_params": self.excluded})
            self.store.consolidate()  # finished: plain xr.open_zarr(path) opens quietly
        finally:
            self._release()

    def _abandon(self) -> None:
        """Release the store and the hooks without writing (the store's folder was removed meanwhile)."""
        self._work = None
        self._worker.shutdown()
        self._appender.shutdown()
        self._release()

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        if self.hooks is not None:
            self.hooks.remove()
        self.store.close()
        self.closed = True

    def __enter__(self) -> NoiseMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:
            self._raised = True
        self.close()

    # -- internals ------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise UsageError("this NoiseMonitor is closed; create a new one (resume=True to continue its store)")

    def _start(self) -> Pending:
        if self._pending is None:
            self._pending = Pending(self.t, self.t % self.every == 0)
        return self._pending

    def _per_example(self, batch: Batch, n: int, need_grad: bool = True) -> Tensor:
        """The per-example losses of ``batch`` (non-finite values allowed: such steps are counted and flagged).

        At the first recorded step it also notes whether the forward drew random numbers (dropout, noise
        layers): the torch.func fallback re-runs the loss and would draw others, so its parameters are then
        excluded."""
        states = _rng_states(self.params) if self._random_forward is None and self.fallback else None
        out = self.loss_fn(self.model, batch)
        if states is not None:
            self._random_forward = any(not torch.equal(a, b) for a, b in zip(states, _rng_states(self.params)))
        return check_loss_output(out, n, name=loss_name(self.loss_fn),
                                 need_grad=need_grad and torch.is_grad_enabled(), finite=False)

    def _unchanged_grads(self, marks: Mapping[str, tuple[Any, int]]) -> list[str]:
        """The tensors whose ``.grad`` is still the one ``marks`` saw (the same tensor, at the same version)."""
        out = []
        for name, (ref, version) in marks.items():
            g = self.params[name].grad
            if g is not None and ref() is g and g._version == version:
                out.append(name)
        return out

    def _grads_reset(self, pending: Pending) -> bool:
        """Whether every ``.grad`` this step's backward left has been zeroed or replaced since: a new step began
        although no optimizer step closed the last one."""
        return not self._unchanged_grads(pending.grad_versions)

    def _drop_unstepped(self, pending: Pending) -> Pending:
        """The last backward was not followed by an optimizer step (a GradScaler skipping a step with inf/NaN
        gradients, say): its batch is not this step's; drop it, once saying so."""
        if self.hooks is not None:
            self.hooks.disarm()
        self._pending = None
        if not self._warned_unstepped:
            self._warned_unstepped = True
            note = (f"step {pending.step}: a backward of {pending.batch_size} examples was followed by zeroed "
                    "gradients but no optimizer step (a GradScaler skipping a step with inf/NaN gradients?): those "
                    "examples are not counted in any step")
            log.warning("NoiseMonitor: %s", note)
            self.store.add_note(note)
        return self._start()

    def _backward_starts(self, g: Tensor, micro: Micro, pending: Pending) -> None:
        """The hook on the per-example losses: their weights wᵢ, the examples counted, and, at the step's first
        backward, before it accumulates anything, whether a ``.grad`` still holds the last step's (not zeroed
        since the optimizer step: the same tensor, not modified since)."""
        if not micro.weights:
            pending.batch_size += micro.n
        micro.weights.append(g.detach())
        if pending.marks is not None:
            marks, pending.marks = pending.marks, None
            pending.stale = self._unchanged_grads(marks)

    @staticmethod
    def _count(pending: Pending, n: int) -> None:
        """The hook on the per-example losses of a step that is not recorded: its examples are counted."""
        pending.batch_size += n

    def _mark_grads(self) -> None:
        """After a step, before a recorded one: which ``.grad`` tensors exist, at which version (weak references:
        a ``.grad`` set to None is freed as usual)."""
        self._grad_marks = {n: _grad_mark(p.grad) for n, p in self.params.items() if p.grad is not None} or None

    def _check_batch_norm(self) -> None:
        """Once, at the first recorded loss() call (the monitor may have been built while the model was in eval
        mode): batch norm in training mode couples the examples of a batch, said and noted."""
        self._bn_checked = True
        interacting = [type(m).__name__ for m in self.model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if interacting:
            note = (f"batch norm in training mode ({interacting[0]}) couples the examples of a batch: the "
                    "per-example gradients are not those of independent examples")
            log.warning("NoiseMonitor: %s", note)
            self.store.add_note(note)

    def _check_uses(self, per: Tensor) -> None:
        """Once, at the first recorded step: parameters used outside their hooked module go to the fallback."""
        self._uses_checked = True
        moved = self.hooks.check_uses(per) if per.grad_fn is not None else []
        moved = [n for n in moved if n in self.params and n not in self.fallback]
        if moved:
            self.fallback.extend(moved)  # said here, not again as "called without the batch dimension"
            log.info("NoiseMonitor: %s used outside their module in the forward (e.g. tied weights): per-example "
                     "norms by torch.func", moved)
            self.store.set_attrs({"fallback_params": self.fallback})

    def _check_sums(self, sums: dict[str, Tensor]) -> None:
        """Once (:func:`gradlab.monitor.checks.extra_loss_terms`): a loss with other terms estimates no step."""
        if not sums:  # no hooked Linear on (B, d) to compare with: nothing to check, now or later
            self._sums_check = False
            return
        bad = extra_loss_terms(self.params, sums)
        if bad is None:  # no gradient, or a non-finite step: a later step is checked
            return
        self._sums_check = bool(bad)
        if bad:
            note = extra_terms_note(bad)
            log.warning("NoiseMonitor: %s", note)
            self.store.add_note(note)

    def _check_replaced(self, step: int) -> None:
        """At the first recorded steps and every 64th: whether the model's trainable tensors are still the ones
        the monitor hooked (a layer replaced after the monitor was built is not measured): said once."""
        every = dict(self.model.named_parameters())
        now = {n: p for n, p in every.items() if p.requires_grad}
        if len(now) == len(self.params) and all(now.get(n) is p for n, p in self.params.items()):
            return
        self._warned_replaced = True
        frozen = [n for n, p in self.params.items() if every.get(n) is p and not p.requires_grad]
        if frozen and all(every.get(n) is p for n, p in self.params.items()) and set(now) <= set(self.params):
            note = (f"step {step}: {frozen[:3]}{'…' if len(frozen) > 3 else ''} were frozen (requires_grad=False) "
                    "after NoiseMonitor(...) was built: they get no gradient from here on and count as zero in "
                    "every group (the groups' sums no longer cover the same tensors as before)")
            log.warning("NoiseMonitor: %s", note)
            self.store.add_note(note)
            return
        new = [n for n, p in now.items() if self.params.get(n) is not p]
        gone = [n for n, p in self.params.items() if now.get(n) is not p]
        note = (f"step {step}: the model's parameters are not those the monitor was built with (a layer replaced "
                f"after NoiseMonitor(...)?): {new[:3]} are not measured, and the monitored {gone[:3]} are no longer "
                "the model's: every number from here on leaves them out; build the monitor once the model is final")
        log.warning("NoiseMonitor: %s", note)
        self.store.add_note(note)

    def _make_grad_hook(self, name: str) -> Any:
        def hook(p: Tensor) -> None:
            pend = self._pending
            if pend is not None and pend.record and not pend.observed and p.grad is not None:
                pend.grad_sq[name] = _sqnorm(p.grad.detach())
                pend.grad_versions[name] = _grad_mark(p.grad)
        return hook

    def _make_micro_hook(self, name: str) -> Any:
        def hook(g: Tensor) -> None:
            pend = self._pending
            if pend is not None and pend.record and pend.micros:  # the last call whose backward began
                target = next((m for m in reversed(pend.micros) if m.weights), pend.micros[-1])
                target.norms[name] = _sqnorm(g.detach())
        return hook

    def _collect(self, pending: Pending, ready_only: bool = False) -> None:
        """Per-example norms of the loss() calls whose backward has run (their hooks have fired by now); unless
        ``ready_only``, the calls whose loss was never backpropagated are dropped from the step (noted once)."""
        for micro in [m for m in pending.micros if not m.collected]:
            if micro.weights:
                if self.hooks is not None:
                    self._collect_micro(pending, micro)
                micro.collected = True
            elif not ready_only:
                self._drop_micro(pending, micro)

    def _drop_micro(self, pending: Pending, micro: Micro) -> None:
        pending.micros = [m for m in pending.micros if m is not micro]
        micro.calls = micro.batch = None
        if not self._warned_unused:
            self._warned_unused = True
            note = (f"step {pending.step}: monitor.loss() was called on a batch of {micro.n} examples whose loss "
                    "was not backpropagated before the step closed (a logging call, or an evaluation outside "
                    "torch.no_grad()?): that batch is left out of the step; compute such losses under "
                    "torch.no_grad() (not recorded) or without the monitor")
            log.warning("NoiseMonitor: %s", note)
            self.store.add_note(note)

    def _collect_micro(self, pending: Pending, micro: Micro) -> None:
        micro.collected = True
        check = self._sums_check is None and len(pending.micros) == 1 and not pending.observed
        sums: dict[str, Tensor] | None = {} if check else None
        if self._background and not check:  # the arithmetic on the worker; what it reads is marked
            plan = self.hooks.take(micro.n, micro.calls)
            micro.marks = input_marks(c.inp for _, _, calls in plan for c in calls if isinstance(c.inp, Tensor))
            micro.job = self._worker.submit(self.hooks.compute, plan)
        else:
            micro.norms = self.hooks.collect(micro.n, sums, micro.calls)
        if check:
            self._check_sums(sums or {})
        self.hooks.disarm()
        new = [n for n in self.hooks.unbatched if n in self.params and n not in self.fallback]
        if new:  # e.g. position embeddings called on (1, T): per-example gradients by torch.func from now on
            self.fallback.extend(new)
            log.info("NoiseMonitor: %s called without the batch dimension (or used outside their module): "
                     "per-example norms by torch.func", new)
            self.store.set_attrs({"fallback_params": self.fallback})
        todo = [n for n in self.fallback if n not in self.excluded]
        if todo and self._random_forward:
            self.excluded.extend(todo)
            note = (f"no per-example gradients for {todo}: the forward draws random numbers (dropout?), and "
                    "re-running it for their per-example gradients would draw others: excluded from every group "
                    "(build the model with dropout 0, or put it in eval mode, to measure them)")
            log.warning("NoiseMonitor: %s", note)
            self.store.add_note(note, excluded_params=self.excluded)
            todo = []
        if todo and micro.weights:
            try:
                micro.unscaled = fallback_sq_norms(self.model, self.loss_fn, micro.batch, todo)
            except Exception as exc:  # noqa: BLE001 - any failure: exclude those tensors, say so
                self.excluded.extend(todo)
                note = (f"no per-example gradients for {todo} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}): excluded from every group")
                log.warning("NoiseMonitor: %s", note)
                self.store.add_note(note, excluded_params=self.excluded)
        micro.batch = micro.calls = None

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._wait_work()  # the worker may read θ: it finishes before the update
        pend = self._start()
        if pend.record:
            pend.lr = float(optimizer.param_groups[0].get("lr", math.nan))
            self._collect(pend)  # before the update: the fallback parameters' gradients are taken at θ_t
            if self.distances:
                self._dist.before_step()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._finish(updated=True)

    def _finish(self, updated: bool = False) -> None:
        """Close the step: S₁, Q, the norms and the loss in one float64 vector copied to the host once; the
        estimates and the moving-average state go to the row buffer (smoothed and written at :meth:`flush`)."""
        pend = self._pending
        self._pending = None
        self.t += 1
        self.examples_seen += pend.batch_size if pend else 0
        self._grad_marks = None
        if self.t % self.every == 0:
            self._mark_grads()
        if pend is None or not pend.record:
            if self.hooks is not None:
                self.hooks.disarm()
            return
        self._collect(pend)
        if self.hooks is not None:
            self.hooks.disarm()
        if not self._warned_replaced and (pend.step < 4 * self.every or pend.step % (64 * self.every) == 0):
            self._check_replaced(pend.step)
        if self.pool_size is not None and pend.batch_size > self.pool_size:
            raise UsageError(f"step {pend.step} has {pend.batch_size} examples, more than pool_size={self.pool_size} "
                             "(the number of training examples batches are drawn from without replacement); pass "
                             "the size of the training set, or pool_size=None for draws with replacement")
        self._wait_work()  # (the pre-step hook did, unless no optimizer step came between)
        cap = self._dist.capture(updated) if self.distances else None
        ctx = (pend, self._seen(), np.array([name in self.excluded for name in self.names]), time.time())
        if self._background:
            theta = marks(self.params.values())
            dirs = marks(d for _, d, _ in cap.dirs) if cap is not None and cap.dirs is not None else []
            job = self._worker.submit(self._numbers, pend, cap, self.every == 1)
            self._work = (job, ctx, theta, dirs)
        else:  # at every=1 the pass also copies θ_{t+1} into the snapshot: the next step's copy is skipped
            keep = self.every == 1 and cap is not None
            self._record(ctx, self._numbers(pend, cap, keep))
            if keep:
                self._dist.kept(marks(self.params.values()))

    def _numbers(self, pend: Pending, cap: Any, keep: bool) -> tuple[np.ndarray, int, int, int | None, bool, bool]:
        """A recorded step's arithmetic (on the worker, or at once): S₁, Q, the norms and the loss in one float64
        vector copied to the host once, the missing code, k, the size of the per-example rows, which norms."""
        for m in pend.micros:
            if m.job is not None:  # an earlier job of the same worker: done by now
                m.norms, m.job = m.job.result(), None
        s1, q, mat, missing, k = step_sums(pend, self.names, self.estimator)
        parts = [s1, q]
        dist = upd = None
        if cap is not None:
            upd, dist = self._dist.measure(cap, keep)
            parts += [dist] + ([upd] if upd is not None else [])
        total = loss_sum(pend)
        total = total if isinstance(total, Tensor) else torch.tensor(float(total))
        parts.append(total.detach().to(device=s1.device, dtype=torch.float64).reshape(1))
        if mat is not None:  # the per-example rows' non-finite entries are counted on the host if they are few
            parts.append(mat.reshape(-1) if mat.numel() <= 4096 else
                         (~torch.isfinite(mat)).sum().to(torch.float64).reshape(1))
        arr = torch.cat([x.to(s1.device) for x in parts]).cpu().numpy()  # the step's one copy
        return arr, missing, k, None if mat is None else mat.numel(), dist is not None, upd is not None

    def _wait_work(self) -> None:
        """Record the worker's last step (before θ changes, or the rows are written), checking that nothing it
        read was changed in place meanwhile (:mod:`gradlab.monitor.worker`)."""
        if self._work is None:
            return
        (job, ctx, theta, dirs), self._work = self._work, None
        numbers = job.result()
        dist_ok = unchanged(theta) and unchanged(dirs)
        norms_ok = all(unchanged(m.marks) for m in ctx[0].micros)
        if dist_ok and self.every == 1:
            self._dist.kept(theta)
        if not (dist_ok and norms_ok):
            self._background = False
            if not self._warned_edit:
                self._warned_edit = True
                what = ("a parameter (or an optimizer buffer)" if not dist_ok else "a layer input") + \
                    " was changed in place after the optimizer step"
                lost = "the update norm and the distance from init are NaN" if not dist_ok else \
                    "the step is not estimated (missing = 7)"
                note = (f"step {ctx[0].step}: {what}, while the background worker read it: {lost} at that step, "
                        "and the monitor computes on the training thread from then on")
                log.warning("NoiseMonitor: %s", note)
                self.store.add_note(note)
        self._record(ctx, numbers, norms_ok=norms_ok, dist_ok=dist_ok)

    def _record(self, ctx: tuple[Any, ...], numbers: tuple[Any, ...], norms_ok: bool = True,
                dist_ok: bool = True) -> None:
        """A recorded step's row from its numbers, with the missing code and its notes."""
        pend, examples_seen, excluded, wall_time = ctx
        arr, missing, k, mat_numel, has_dist, has_upd = numbers
        if not norms_ok and missing == 0:
            missing = 7
        if missing == 0 and self._sums_check:
            missing = 6
        if pend.stale and missing in (0, 6):
            missing = 6
            if not self._warned_stale:
                self._warned_stale = True
                note = (f"step {pend.step}: .grad of {pend.stale[:3]} was not zeroed since the last optimizer step "
                        "(its backward added to the last step's gradient): ‖.grad‖² is not this step's, so the "
                        "step is not estimated (missing = 6); call optimizer.zero_grad() before each step's "
                        "backward")
                log.warning("NoiseMonitor: %s", note)
                self.store.add_note(note)
        if missing in (3, 4) and missing not in self._warned_codes:
            self._warned_codes.add(missing)
            note = (f"step {pend.step}: " + (
                "the backpropagated loss weights the examples unequally (∂L/∂ℓᵢ differ: micro-batches of "
                "unequal sizes, each loss divided by the number of micro-batches, or a weighted loss), which the "
                "estimators do not model: the step is not estimated (missing = 3); weight every "
                "example alike: backpropagate monitor.loss(mb) * len(mb) / batch_size for each micro-batch (or "
                "reduction='sum' scaled by 1 / batch_size)" if missing == 3 else
                "the two-batch estimator needs at least two micro-batches per optimizer step, each with its own "
                f"backward (monitor.loss(mb) then .backward() per micro-batch); this one had {k}: not estimated "
                "(missing = 4); split each batch into micro-batches backpropagated one by one, or use "
                "estimator='per-example'"))
            log.warning("NoiseMonitor: %s", note)
            self.store.add_note(note)
        if missing == 5 and not self._warned_no_loss:
            self._warned_no_loss = True
            log.warning("NoiseMonitor: step %d had no backpropagated monitor.loss(batch) (the loss that was "
                        "backpropagated was computed without it, e.g. already reduced): recorded as missing; "
                        "backpropagate monitor.loss(batch), or call monitor.observe(batch) before the optimizer "
                        "step", pend.step)
        n = len(self.names)
        end = 2 * n + (n if has_dist else 0) + (n if has_upd else 0)
        rows = arr[end + 1:]
        if missing == 7:  # what the worker read changed: nothing measured
            s1, q, nonfinite = np.full(n, np.nan), np.full(n, np.nan), 0
        else:
            s1, q = arr[:n], arr[n:2 * n]
            nonfinite = 0 if mat_numel is None else int(rows[0]) if mat_numel > 4096 else \
                int((~np.isfinite(rows)).sum())
        self._rows.append(StepCopy(
            s1=s1, q=q, dist=arr[2 * n:3 * n] if has_dist and dist_ok else np.full(n, np.nan),
            update=arr[3 * n:4 * n] if has_upd and dist_ok else None, nonfinite=nonfinite,
            loss_sum=float(arr[end]), step=pend.step, examples_seen=examples_seen, batch_size=pend.batch_size,
            n_groups=k, missing=missing, lr=pend.lr, excluded=excluded, wall_time=wall_time))
        if len(self._rows) >= self.store.chunk_steps:
            self._submit()

