"""The live gradient-noise monitor: per-step ‖G‖², tr Σ, B_simple and the smoothed B_noise while training.

``NoiseMonitor`` (plain loops), ``attach_for_train`` (``gradlab train``), ``gradlab.monitor.lightning``
(a Lightning ``Callback``) and ``gradlab.monitor.hf`` (a transformers ``TrainerCallback``).  The estimators
(:mod:`gradlab.monitor.estimators`) and the store (:mod:`gradlab.monitor.store`) import without torch; the names
below are imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NoiseMonitor", "attach_for_train", "open_monitor"]


def __getattr__(name: str) -> Any:
    if name == "NoiseMonitor":
        from gradlab.monitor.monitor import NoiseMonitor

        return NoiseMonitor
    if name == "attach_for_train":
        from gradlab.monitor.attach import attach_for_train

        return attach_for_train
    if name == "open_monitor":
        from gradlab.monitor.store import open_monitor

        return open_monitor
    raise AttributeError(f"module 'gradlab.monitor' has no attribute {name!r}")
