"""``run_job``: create or resume a store, compute its undone units, write them, finalize (see the package doc)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import StoreError
from gradlab.store import option
from gradlab.runner.dispatch import check_dispatch, check_travels, dask_client, dask_results, local_results, seed_state
from gradlab.runner.job import Job, RunSummary, Unit, UnitContext
from gradlab.runner.threads import default_threads

log = logging.getLogger(__name__)

INPUTS_ATTR = "input_sha256"


def input_hashes(paths: Sequence[str]) -> dict[str, str]:
    """SHA-256 of each input file (a Hugging Face folder: of its config and weight files), by resolved path."""
    from gradlab.checkpoint import checkpoint_sha256

    return {str(Path(p).resolve()): checkpoint_sha256(Path(p)) for p in dict.fromkeys(paths)}


FINGERPRINT_ATTR = "task_sha256"  # JSON {what: SHA-256} of the code and data the results depend on (by key below)
_CODE_PARTS = (("data", "data factory"), ("model", "model factory"), ("loss", "loss"), ("collate", "collate function"))


def code_fingerprints(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{"data_code": sha, ...}``: the SHA-256 of the code (:func:`gradlab.task.code_sha256`) of every user
    factory a config names as ``pkg.module:fn`` under ``data``, ``model``, ``loss`` or ``collate``.  Live objects
    of the Python API carry a digest in their name (the config) and are left out."""
    from gradlab.factory import resolve_factory
    from gradlab.task import code_sha256

    out = {}
    for key, what in _CODE_PARTS:
        spec = cfg.get(key)
        if not isinstance(spec, str) or ":" not in spec or spec.startswith("live:"):
            continue
        try:
            sha = code_sha256(resolve_factory(spec, key))
        except Exception:  # noqa: BLE001 -- an unimportable factory fails where it is used, with its own message
            continue
        if sha:
            out[f"{key}_code"] = sha
    return out


def _describe(key: str, cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(what changed, how it shows) for a fingerprint key such as ``data_content``."""
    part, _, kind = key.rpartition("_")
    spec = cfg.get(part)
    name = dict(_CODE_PARTS).get(part, part)
    named = f" {spec!r}" if isinstance(spec, str) else ""
    if kind == "code":
        return f"the code of the {name}{named}", "the SHA-256 of its source and of the functions it uses differs"
    if kind == "content":
        return f"the data{named}", "the SHA-256 of its tensors differs"
    if kind == "architecture":
        return f"the model{named}", "the SHA-256 of its architecture and trainable parameters differs"
    return f"the {part}{named}", "its SHA-256 differs"


def _legacy_task_check(writer: Any, cfg: Mapping[str, Any]) -> None:
    """Stores made before ``task_sha256``: compare the source digests their ``task`` attr records."""
    from gradlab.factory import resolve_factory
    from gradlab.task import source_sha256

    try:
        task = json.loads(writer.group.attrs.get("task") or "{}")
    except (TypeError, ValueError):
        return
    for key, what in _CODE_PARTS:
        stored, spec = task.get(f"{key}_source_sha256"), task.get(key)
        if not stored or not isinstance(spec, str) or ":" not in spec or spec.startswith("live:"):
            continue
        try:
            now = source_sha256(resolve_factory(spec, key))
        except Exception:  # noqa: BLE001
            continue
        if now is not None and now != stored:
            raise StoreError(f"the {what} {spec!r} changed since {writer.path} was started (the SHA-256 of its "
                             f"source differs); restore it, or start a new store with another {option('out')}")


def _check_inputs(writer: Any, job: Job, fingerprints: Callable[[], Mapping[str, str]] | None = None) -> None:
    """Refuse to resume a store whose input files, user code or data changed since it was made."""
    stored = writer.group.attrs.get(INPUTS_ATTR)
    for path, sha in (json.loads(stored).items() if stored is not None else ()):
        if not Path(path).exists():
            raise StoreError(f"{path}, an input of {writer.path}, is missing; restore it to resume, or start a new "
                             f"store with another {option('out')}")
        if input_hashes([path])[path] != sha:
            raise StoreError(f"{path} changed since {writer.path} was started (SHA-256 differs); restore it, or "
                             f"start a new store with another {option('out')}")
    if fingerprints is None:
        return
    cfg = job.config_dict()
    stored_fps = writer.group.attrs.get(FINGERPRINT_ATTR)
    if stored_fps is None:
        _legacy_task_check(writer, cfg)
        return
    now = fingerprints()
    for key, sha in sorted(json.loads(stored_fps).items()):
        if key in now and now[key] != sha:
            what, why = _describe(key, cfg)
            raise StoreError(f"{what} changed since {writer.path} was started ({why}); restore it, or start a new "
                             f"store with another {option('out')}")


def unit_done(done: np.ndarray, unit_dims: Sequence[str], unit: Unit) -> bool:
    """Whether every ``done`` entry of the unit's region is set."""
    index = tuple(unit.region.get(d, slice(None)) for d in unit_dims)
    return bool(np.all(done[index]))


def _kill_hook(stage: str, count: int) -> None:
    """Test hook: ``GRADLAB_KILL_AFTER`` (or ``GRADLAB_PROBE_KILL_AFTER``) = ``write:K`` / ``done:K`` SIGKILLs the
    driver right after the K-th unit's arrays are written (before it is marked done) / after it is marked done."""
    spec = os.environ.get("GRADLAB_KILL_AFTER") or os.environ.get("GRADLAB_PROBE_KILL_AFTER")
    if spec and spec == f"{stage}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


def _create(job: Job, out: Path, workers: int | None, fingerprints: Callable[[], Mapping[str, str]]) -> None:
    from gradlab.store import create_store

    tmpl = job.template()
    attrs = dict(tmpl.attrs)
    files = list(job.input_files())
    if files:
        attrs[INPUTS_ATTR] = json.dumps(input_hashes(files), sort_keys=True)
    fps = fingerprints()
    if fps:
        attrs[FINGERPRINT_ATTR] = json.dumps(dict(fps), sort_keys=True)
    if job.threads():
        attrs.setdefault("torch_threads", default_threads(workers))
    create_store(out, kind=job.kind, sizes=tmpl.sizes, coords=tmpl.coords, variables=tmpl.variables,
                 unit_dims=tmpl.unit_dims, chunks=tmpl.chunks, config=job.config_dict(), attrs=attrs)


def _say_fn(kind: str, progress: bool, say: Callable[[str], Any] | None) -> Callable[[str], None]:
    from tqdm import tqdm

    def say_line(msg: str) -> None:
        if not progress:
            log.info("%s", msg)
            return
        with tqdm.external_write_mode(file=sys.stderr):
            if say is not None:
                say(msg)
            else:
                print(f"gradlab {kind}: {msg}", file=sys.stderr, flush=True)

    return say_line


def run_job(job: Job, out: str | os.PathLike, *, resume: bool = False, workers: int | None = None,
            scheduler: str | None = None, progress: bool = True, say: Callable[[str], Any] | None = None,
            state: Any = None) -> RunSummary:
    """Create (or, with ``resume``, continue) the store at ``out`` and compute every undone unit of ``job``, then
    its finalize step.  ``workers``/``scheduler``: compute units on a local Dask cluster of that many worker
    processes, or on the cluster at that address; the driver is the only writer.  ``progress``: a bar on stderr
    and the job's messages (``say``: where they go instead of stderr).  ``state``: the job's prepared state when
    the caller already built it (validation loads everything), so this process does not build it twice.
    """
    from tqdm import tqdm

    from gradlab.store import writer_for

    check_dispatch(workers, scheduler)
    if workers or scheduler:
        check_travels(job)
    if state is not None:
        seed_state(job, state)
    start = time.perf_counter()
    out = Path(out)
    cfg = job.config_dict()
    units = list(job.units())
    totals: dict[str, float] = {}
    client = cluster = None
    created_here = not out.exists()
    made: list[bool] = []
    cache: dict[str, str] | None = None

    def fingerprints() -> dict[str, str]:  # computed once per run (the data's digest reads every tensor)
        nonlocal cache
        if cache is None:
            cache = {**code_fingerprints(cfg), **dict(job.fingerprints())}
        return cache

    def create() -> None:
        _create(job, out, workers, fingerprints)
        made.append(True)

    try:
        with writer_for(out, resume=resume, config=cfg, create=create) as writer:
            try:
                _check_inputs(writer, job, None if made else fingerprints)
                done = writer.done()
                held = [unit_done(done, writer.unit_dims, u) for u in units]  # one pass: linear in the units
                todo = [u for u, h in zip(units, held) if not h]
                say_line = _say_fn(job.kind, progress, say)
                for u, h in zip(units, held):
                    if h:
                        job.on_skip(u, UnitContext(say=say_line))
                log.info("%s %s: %d of %d units to compute", job.kind, out, len(todo), len(units))
                threads = writer.group.attrs.get("torch_threads")
                threads = int(threads) if threads is not None and job.threads() else None
                bar = tqdm(total=sum(u.work for u in todo) or None, desc=job.progress_desc or job.kind,
                           unit=job.progress_unit, file=sys.stderr, disable=not progress, leave=False,
                           dynamic_ncols=True)
                ctx = UnitContext(tick=lambda n=1: bar.update(n), say=_say_fn(job.kind, progress, say))
                with bar:
                    if todo and (workers or scheduler):
                        client, cluster = dask_client(workers, scheduler)
                        results = dask_results(client, job, todo, threads)
                    else:
                        results = local_results(job, todo, threads, ctx)
                    for n_done, (unit, result) in enumerate(results, start=1):
                        for name, values in result.items():
                            writer.write(name, unit.region, values)
                        _kill_hook("write", n_done)
                        writer.mark_done(unit.region)
                        _kill_hook("done", n_done)
                        for key, value in (job.on_result(unit, result, ctx) or {}).items():
                            totals[key] = totals.get(key, 0) + value
                        if client is not None:
                            bar.update(unit.work)
                    job.finalize(writer, ctx)  # a job that needs its state asks for it (job.state())
            except BaseException:
                job.on_failure(writer, created_here and not writer.done().any())
                raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return RunSummary(str(out), len(todo), len(units), time.perf_counter() - start, totals)

