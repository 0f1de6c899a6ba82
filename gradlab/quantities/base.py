"""The contract of a measured quantity: it declares its outputs and computes them from explicit inputs.

A per-trial quantity of the probe is a small frozen class (:class:`TrialQuantity`) that

- declares each output (:class:`Output`: name, long_name, units, store dims, dtype) -- the store template, the
  analysis table and the figure labels are derived from these declarations, nothing else spells them;
- says which probe protocols supply its inputs (``protocols``) and how a reader should read its figure
  (``caption``);
- computes, from one trial's :class:`TrialInputs`, one array per output shaped as its dims without
  ``checkpoint`` and ``trial``.

Scheduling, seeding, devices and storage live outside it (the runner and the protocol modules).  The registry is
the explicit dict :data:`gradlab.quantities.QUANTITIES`; CONTRIBUTING.md has the recipe for adding one.  This
module imports without torch (the analysis side reads the declarations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Output:
    """One stored output of a quantity.  ``dims`` are the store dims: they start with ``checkpoint`` and contain
    ``trial`` (e.g. ``("checkpoint", "batch_size", "trial")``); the other dims must be dims of the probe store
    (``batch_size``, ``minibatch``, ``layer``, ``group``, ``example``)."""

    name: str
    long_name: str
    units: str
    dims: tuple[str, ...]
    dtype: str = "float64"
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dims or self.dims[0] != "checkpoint" or "trial" not in self.dims:
            raise ValueError(f"output {self.name!r}: dims {self.dims} must start with 'checkpoint' and contain "
                             "'trial'")

    @property
    def trial_dims(self) -> tuple[str, ...]:
        """The dims of one trial's array (the store dims without ``checkpoint`` and ``trial``)."""
        return tuple(d for d in self.dims if d not in ("checkpoint", "trial"))


@dataclass(frozen=True)
class TrialInputs:
    """What a protocol hands a quantity for one trial (``None`` where the protocol does not supply it).

    ``batch_sizes`` (M,), ``reduction`` (``mean``/``sum``), ``budget`` N.  Frozen protocol: ``gram``, the (N, N)
    float64 per-example Gram matrix Kᵢⱼ = gᵢ·gⱼ over the selected tensors (a torch tensor), and ``layer_grams``
    (name -> (N, N)).  Step protocol: ``step_sums`` (per batch size, layer name -> S of the trial) and
    ``displacement`` (M,) ‖θ_end − θ‖."""

    batch_sizes: tuple[int, ...]
    reduction: str
    budget: int
    gram: Any = None
    layer_grams: Mapping[str, Any] | None = None
    step_sums: Sequence[Mapping[str, np.ndarray]] | None = None
    displacement: np.ndarray | None = None


class TrialQuantity:
    """A per-trial quantity (see the module docstring).  Subclasses set the class attributes and
    :meth:`compute`; they hold only hyperparameters (none, usually) and must be frozen/stateless."""

    outputs: ClassVar[tuple[Output, ...]] = ()
    protocols: ClassVar[tuple[str, ...]] = ("frozen",)
    caption: ClassVar[str] = ""  # how to read the quantity's figure (the report shows it under the figure)
    report: ClassVar[bool] = True  # tabulate and draw it in `gradlab analyze` (False: used by other estimates)

    def compute(self, inputs: TrialInputs) -> dict[str, np.ndarray]:
        raise NotImplementedError
