"""The monitor as ``gradlab train`` wires it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradlab.monitor.monitor import NoiseMonitor
from gradlab.task import PerExampleLoss


def attach_for_train(model: nn.Module, optimizer: torch.optim.Optimizer, loss: str | PerExampleLoss,
                     store_path: str | os.PathLike, *, every: int = 1, resume: bool = False, start_step: int = 0,
                     pool_size: int | None = None, config: Mapping[str, Any] | None = None,
                     reduction: str = "mean") -> NoiseMonitor:
    """The monitor as ``gradlab train`` wires it: optimizer hooks close each step; ``monitor.loss(batch)`` replaces
    the loss computation of the loop; ``monitor.flush()`` before each checkpoint; ``monitor.close()`` at the end.

    ``pool_size``: the training-set size when every epoch is a shuffled pass (batches drawn without replacement).
    ``resume`` with ``start_step`` (the optimizer steps of the restored checkpoint) continues the store, or starts one
    at that step if there is none.
    """
    return NoiseMonitor(model, loss, store_path, optimizer=optimizer, every=every, resume=resume,
                        start_step=start_step if resume else None, pool_size=pool_size, config=config,
                        reduction=reduction)
