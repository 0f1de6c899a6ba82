"""``NoiseMonitorCallback``: the noise monitor as a PyTorch Lightning ``Callback``.

Lightning runs the forward/backward inside its own loop (and inside the optimizer's closure), so the callback
uses :meth:`NoiseMonitor.observe`: on each recorded step it runs one extra forward/backward of the per-example
losses on the step's batch at the current θ (``torch.autograd.grad``: the module's ``.grad`` is not touched), and
the optimizer's step hooks record the learning rate, the update norm and close the step.  Steps that are not
recorded cost nothing.  Resuming a fit from a checkpoint continues the store at ``trainer.global_step``; the store
is flushed whenever Lightning saves a checkpoint.

    trainer = L.Trainer(max_epochs=3, callbacks=[NoiseMonitorCallback("cross-entropy", "run.zarr", every=4)])
"""

from __future__ import annotations

import os
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

from gradlab.monitor.checks import refuse_managed
from gradlab.monitor.monitor import NoiseMonitor
from gradlab.task import PerExampleLoss


class NoiseMonitorCallback(Callback):
    """Record the gradient noise scale of a Lightning fit into ``path`` (see :class:`NoiseMonitor` for kwargs)."""

    def __init__(self, loss: str | PerExampleLoss, path: str | os.PathLike, *, every: int = 1,
                 **monitor_kwargs: Any) -> None:
        super().__init__()
        refuse_managed(monitor_kwargs, "NoiseMonitorCallback", "fit(ckpt_path=...)")
        self.loss, self.path, self.every, self.kwargs = loss, path, every, monitor_kwargs
        self.monitor: NoiseMonitor | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # not on_fit_start: Lightning restores global_step and the optimizers (fit(ckpt_path=...)) after that hook
        opts = trainer.optimizers
        opt = getattr(opts[0], "optimizer", opts[0]) if opts else None
        start = int(trainer.global_step)
        self.monitor = NoiseMonitor(pl_module, self.loss, self.path, optimizer=opt, every=self.every,
                                    resume=start > 0, start_step=start if start > 0 else None, **self.kwargs)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:
            self.monitor.observe(batch)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.flush()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
