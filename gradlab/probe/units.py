"""What both probe protocols share inside a unit: the data pool and models (cached per process, so a Dask
worker loads them once for all its units), the empty output arrays, and the norms and entry outputs of one S."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import UsageError
from gradlab.probe.config import ProbeConfig, _sha256
from gradlab.probe.layout import store_sizes, store_variables
from gradlab.schema import GROUPS


@functools.lru_cache(maxsize=2)
def pool(data: str, device: str, collate: str | None = None, sha256: str = "") -> Any:
    """The training split as one batch pytree on ``device`` (dtypes as the data gives them).

    ``sha256``: the digest of its tensors when the config was resolved (:func:`gradlab.task.data_sha256`): part of
    the cache key, so a process never reuses a pool whose source changed since, and checked on loading (data that
    changed between the check and the run is refused)."""
    from gradlab.datasets import load_data
    from gradlab.task import data_sha256, to_run

    batch = load_data(data, collate=collate).train.batch
    if sha256 and data_sha256(batch) != sha256:
        raise UsageError(f"the data {data!r} changed since this run checked it (the SHA-256 of its tensors "
                         "differs); make its factory return the same data every time (seeded), then rerun")
    return to_run(batch, device=device)


@functools.lru_cache(maxsize=4)
def _model(path: str, sha256: str, model: str | None, model_kwargs_json: str, input_shape: tuple[int, ...],
           n_classes: int) -> Any:
    from gradlab.checkpoint import build_model_from, load_checkpoint

    ckpt = load_checkpoint(path)
    if _sha256(Path(path)) != sha256:
        raise UsageError(f"{path} changed since the probe started (SHA-256 differs); restore it or start a new store")
    return build_model_from(ckpt, model=model, model_kwargs=json.loads(model_kwargs_json), input_shape=input_shape,
                            n_classes=n_classes)


def checkpoint_model(config: ProbeConfig, c: int) -> Any:
    spec = config.checkpoints[c]
    return _model(spec.path, spec.sha256, config.model, config.model_kwargs_json, config.input_shape,
                  config.n_classes)


def gram_engine(config: ProbeConfig, c: int) -> Any:
    """This thread's Gram engine for checkpoint ``c`` (engines hook a private model: one per thread)."""
    return _thread_gram_engine(config, c, threading.get_ident())


@functools.lru_cache(maxsize=8)
def _thread_gram_engine(config: ProbeConfig, c: int, thread: int) -> Any:
    import torch

    from gradlab.probe.gram import GramEngine
    from gradlab.task import resolve_loss

    return GramEngine(checkpoint_model(config, c), config.selected, dtype=getattr(torch, config.dtype),
                      device=config.device, loss=resolve_loss(config.loss))


def norms_of(config: ProbeConfig, sums: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """‖S‖, per-layer (NaN if unselected) and per-group norms of one trial's S (float64 accumulation)."""
    from gradlab.probe.distance import param_kind

    layer_sq = np.full(len(config.layers), np.nan)
    for i, n in enumerate(config.layers):
        if n in sums:
            v = np.asarray(sums[n], dtype=np.float64).ravel()
            layer_sq[i] = float(np.einsum("i,i->", v, v))  # not BLAS: the same bits whatever the thread count
    group = np.full(len(GROUPS), np.nan)
    sel = np.array([n in sums for n in config.layers])  # not isnan(layer_sq): a non-finite S must stay NaN
    kinds = np.array([param_kind(n) for n in config.layers])
    for j, g in enumerate(GROUPS):
        mask = sel & ((kinds == g) | (g == "all"))
        if mask.any():
            group[j] = np.sqrt(layer_sq[mask].sum())
    return float(np.sqrt(layer_sq[sel].sum())), np.sqrt(layer_sq), group


def entry_outputs(config: ProbeConfig, vec: np.ndarray, out: dict[str, np.ndarray], i: int, j: int) -> int:
    """Histogram / vector of one S (flattened selected entries) into ``out``; returns its non-finite count."""
    if config.keep == "norms":
        return int((~np.isfinite(vec)).sum())
    from gradlab.probe.histogram import entry_histogram_torch

    counts, nonfinite = entry_histogram_torch(vec)  # the schema's bins and counts, vectorised in torch
    out["entry_hist"][i, j] = counts
    if config.keep == "vectors":
        out["grad_sum"][i, j] = vec
    return nonfinite


def empty_outputs(config: ProbeConfig, tb: int) -> dict[str, np.ndarray]:
    sizes = {**store_sizes(config), "trial": tb}
    out = {}
    for v in store_variables(config):
        if "trial" in v.dims:
            out[v.name] = np.full([sizes[d] for d in v.dims if d != "checkpoint"], v.fill_value(), dtype=v.dtype)
    return out


def put_quantities(quantities: Sequence[Any], inputs: Any, out: dict[str, np.ndarray], j: int) -> None:
    """Compute each registered quantity on one trial's inputs and put its arrays at trial ``j`` of ``out`` (each
    output's trial axis where its declared dims put it)."""
    for q in quantities:
        values = q.compute(inputs)
        for o in q.outputs:
            axis = [d for d in o.dims if d != "checkpoint"].index("trial")
            out[o.name][(slice(None),) * axis + (j,)] = values[o.name]
