"""TEMPORARY local stand-in for ``gradlab.runner`` (the lead's shared runner, not yet on main).

Implements exactly the contract CbsJob is written against (Job, Template, Unit, UnitContext, run_job, RunSummary),
locally only, on top of :mod:`gradlab.store`.  Delete this file once ``gradlab/runner/__init__.py`` lands.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gradlab.errors import UsageError
from gradlab.store import VarSpec, create_store, writer_for


@dataclass(frozen=True)
class Template:
    sizes: dict
    coords: dict
    variables: list
    unit_dims: tuple
    chunks: dict
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    region: dict


class UnitContext:
    def __init__(self, bar: Any = None) -> None:
        self.bar = bar

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr)


class Job:
    kind: ClassVar[str] = ""
    progress_unit: ClassVar[str] = "unit"

    def config_dict(self) -> dict:
        raise NotImplementedError

    def input_files(self) -> list[str]:
        return []

    def template(self) -> Template:
        raise NotImplementedError

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def prepare(self) -> Any:
        return None

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> dict:
        raise NotImplementedError

    def finalize(self, writer: Any, state: Any) -> None:
        return None


@dataclass(frozen=True)
class RunSummary:
    path: Path
    units_total: int
    units_computed: int
    seconds: float


def run_job(job: Job, out: Any, *, resume: bool = False, workers: int | None = None, scheduler: str | None = None,
            progress: bool = True) -> RunSummary:
    if workers or scheduler:
        raise UsageError("the local runner stand-in has no Dask dispatch")
    out = Path(out)
    t0 = time.perf_counter()
    tpl = job.template()
    config = {"kind": job.kind, **job.config_dict()}

    def create() -> None:
        create_store(out, kind=job.kind, sizes=tpl.sizes, coords=tpl.coords, variables=tpl.variables,
                     unit_dims=tpl.unit_dims, chunks=tpl.chunks, config=config, attrs=tpl.attrs)

    units = job.units()
    computed = 0
    with writer_for(out, resume=resume, config=config, create=create) as writer:
        done = writer.done()
        state = None
        for unit in units:
            idx = tuple(unit.region[d] for d in tpl.unit_dims)
            if np.all(done[idx]):
                continue
            if state is None:
                state = job.prepare()
            result = job.compute(state, unit, UnitContext())
            for name, values in result.items():
                writer.write(name, unit.region, values)
            writer.mark_done(unit.region)
            computed += 1
        if state is None:
            state = job.prepare()
        job.finalize(writer, state)
    return RunSummary(out, len(units), computed, time.perf_counter() - t0)


__all__ = ["Job", "Template", "Unit", "UnitContext", "run_job", "RunSummary", "VarSpec"]
