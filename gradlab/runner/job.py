"""What a command tells the runner: its store template, its units, and how to compute and finalize them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gradlab.store import VarSpec


@dataclass(frozen=True)
class Template:
    """Everything :func:`gradlab.store.create_store` needs besides the path, the kind and the config."""

    sizes: Mapping[str, int]
    coords: Mapping[str, tuple[Any, Any, Mapping[str, Any]]]
    variables: Sequence[VarSpec]
    unit_dims: Sequence[str]
    chunks: Mapping[str, int]
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """One unit of work: a chunk-aligned block of the ``done`` mask (``region``: dim -> int or slice) and a label
    for messages.  A unit's results depend only on the job's config and the unit's coordinates."""

    region: Mapping[str, int | slice]
    label: str = ""
    work: int = 1  # progress ticks the unit will report (its share of the progress bar)


@dataclass
class UnitContext:
    """What a running unit may use besides its inputs: ``tick(n)`` advances the progress bar by n of the job's
    ``progress_unit``; ``say(msg)`` prints a line on stderr without breaking the bar (both do nothing on a Dask
    worker)."""

    tick: Callable[[int], Any] = lambda n=1: None
    say: Callable[[str], Any] = lambda msg: None


@dataclass(frozen=True)
class RunSummary:
    """What a run did."""

    path: str
    units_computed: int
    units_total: int
    seconds: float
    results: Mapping[str, Any] = field(default_factory=dict)  # job-specific totals (e.g. non-finite counts)


class Job:
    """The description of one command's store.  Subclasses are frozen dataclasses (picklable: Dask ships them to
    workers) and override the methods below; the runner calls them in this order:
    ``input_files`` and ``template`` (creation), ``units``, ``prepare`` (once per process), ``compute`` (per
    unit), ``on_result`` (per unit, driver only), ``finalize`` (driver, after every unit) and ``on_failure``."""

    kind: ClassVar[str] = "job"  # the store's ``gradlab_store`` attr
    progress_desc: ClassVar[str] = ""  # the progress bar's label (default: the kind)
    progress_unit: ClassVar[str] = "unit"

    def config_dict(self) -> dict[str, Any]:
        """The resolved config, JSON-able: stored with its hash; a resume with another config is refused."""
        raise NotImplementedError

    def input_files(self) -> Sequence[str]:
        """Files the results depend on: their SHA-256 is recorded when the store is made and checked on resume."""
        return ()

    def fingerprints(self) -> Mapping[str, str]:
        """SHA-256 digests of what the results depend on besides the config and the input files, keyed
        ``"<part>_content"`` (the data's tensors) or ``"<part>_architecture"`` (the model built): recorded when the
        store is made and compared on resume (a resume after one changed is refused).  The runner adds the code of
        the user factories the config names (``"<part>_code"``) itself."""
        return {}

    def template(self) -> Template:
        raise NotImplementedError

    def units(self) -> Sequence[Unit]:
        raise NotImplementedError

    def prepare(self) -> Any:
        """Heavy state shared by the units (models, data): built once per process and cached by the runner."""
        return None

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> Mapping[str, np.ndarray]:
        """The unit's arrays, each shaped as its region of the store (unit dims of size 1 dropped)."""
        raise NotImplementedError

    def on_skip(self, unit: Unit, ctx: UnitContext) -> None:
        """Called on the driver for a unit that a resumed store already holds."""

    def on_result(self, unit: Unit, result: Mapping[str, np.ndarray], ctx: UnitContext
                  ) -> Mapping[str, float] | None:
        """Called on the driver once a unit's result is written (warnings); returned numbers are summed over
        units into :attr:`RunSummary.results`."""
        return None

    def finalize(self, writer: Any, ctx: UnitContext) -> None:
        """Write variables derived from the stored units; idempotent (a resume runs it again).  Not handed the
        prepared state: a job whose finalize needs it calls :meth:`state`, so resuming a complete store (or a
        Dask run, whose units were prepared on the workers) loads no models or data on the driver for nothing."""

    def on_failure(self, writer: Any, created: bool) -> None:
        """Clean up the job's own files when the run fails (``created``: this run made the store)."""

    def threads(self) -> bool:
        """Whether units run with the store's recorded torch thread count (bitwise-reproducible results)."""
        return True

    def state(self) -> Any:
        """This process's :meth:`prepare` state (built on first use, then cached)."""
        from gradlab.runner.dispatch import prepared_state

        return prepared_state(self)

    def state_key(self) -> str:
        """The key under which a process caches :meth:`prepare`'s state (default: the config's hash)."""
        from gradlab.provenance import config_hash

        return f"{self.kind}:{config_hash(self.config_dict())}"
