"""The layout of a probe store: its variables (from :mod:`gradlab.schema`), dims, coords and attrs."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gradlab.probe.config import ProbeConfig
from gradlab.probe.sampling import seed_derivation
from gradlab.runner import Template
from gradlab.schema import GROUPS, entry_bin_edges, probe_variables
from gradlab.store import VarSpec


def store_variables(config: ProbeConfig) -> list[VarSpec]:
    """The schema's variables for this config (``entry_hist`` only with keep = histograms or vectors), plus the
    frozen protocol's standard errors of the moment estimates."""
    out = [v for v in probe_variables(config.protocol, config.keep == "vectors")
           if config.keep != "norms" or v.name != "entry_hist"]
    # S is stored in the run dtype: a float64 run keeps its float64 vectors (the schema's float32 is for float32 runs)
    out = [VarSpec(v.name, v.dims, config.dtype, v.long_name, v.units, v.fill, v.attrs)
           if v.name == "grad_sum" and v.dtype != config.dtype else v for v in out]
    if config.keep == "vectors":
        layout, offset = [], 0
        for n, s in zip(config.layers, config.layer_sizes):
            if n in config.selected:
                layout.append([n, offset, s])
                offset += s
        out = [VarSpec(v.name, v.dims, v.dtype, v.long_name, v.units, v.fill,
                       {**v.attrs, "layout": json.dumps(layout),
                        "layout_doc": "[parameter, first element, number of elements] (C order)"})
               if v.name == "grad_sum" else v for v in out]
    return out


def store_sizes(config: ProbeConfig) -> dict[str, int]:
    sizes = {"checkpoint": len(config.checkpoints), "batch_size": len(config.batch_sizes), "trial": config.trials,
             "layer": len(config.layers), "group": len(GROUPS), "example": config.budget,
             "bin": entry_bin_edges()[0].size}
    if config.protocol == "frozen":
        sizes["minibatch"] = config.budget
    if config.keep == "vectors":
        sizes["vector_element"] = config.n_selected
    return sizes


def store_nbytes(config: ProbeConfig) -> int:
    """Uncompressed size of the store's variables (an upper bound on disk: zarr compresses)."""
    sizes = store_sizes(config)
    return int(sum(np.prod([sizes[d] for d in v.dims]) * np.dtype(v.dtype).itemsize
                   for v in store_variables(config)) + np.prod([sizes["checkpoint"], sizes["trial"]]))



def probe_template(config: ProbeConfig) -> Template:
    """The probe store's template: dims, coords, attrs, and every variable (filled by the runner)."""
    from gradlab.probe.distance import param_kind
    from gradlab.provenance import package_versions
    from gradlab.task import task_record

    lower, upper = entry_bin_edges()
    sizes = store_sizes(config)
    ck = config.checkpoints
    coords: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "checkpoint": ("checkpoint", [c.label for c in ck], {"long_name": "checkpoint", "units": "1"}),
        "checkpoint_path": ("checkpoint", [c.path for c in ck], {"long_name": "checkpoint file", "units": "1"}),
        "checkpoint_sha256": ("checkpoint", [c.sha256 for c in ck], {"long_name": "checkpoint SHA-256", "units": "1"}),
        "checkpoint_epoch": ("checkpoint", np.array([c.epoch for c in ck]),
                             {"long_name": "epoch of checkpoint", "units": "epoch"}),
        "init_path": ("checkpoint", [c.init_path for c in ck],
                      {"long_name": "init checkpoint file ('' if unknown)", "units": "1"}),
        "batch_size": ("batch_size", np.array(config.batch_sizes, dtype=np.int64),
                       {"long_name": "batch size m", "units": "examples"}),
        "trial": ("trial", np.arange(config.trials, dtype=np.int64), {"long_name": "trial", "units": "1"}),
        "layer": ("layer", list(config.layers), {"long_name": "parameter tensor", "units": "1"}),
        "param_kind": ("layer", [param_kind(n) for n in config.layers],
                       {"long_name": "weight or bias", "units": "1"}),
        "layer_size": ("layer", np.array(config.layer_sizes, dtype=np.int64),
                       {"long_name": "number of entries", "units": "1"}),
        "selected": ("layer", np.array([n in config.selected for n in config.layers]),
                     {"long_name": "selected by --params (enters the gradient norms)", "units": "1"}),
        "group": ("group", list(GROUPS), {"long_name": "parameter group", "units": "1"}),
        "example": ("example", np.arange(config.budget, dtype=np.int64),
                    {"long_name": "position in the trial's draw", "units": "1"}),
        "bin": ("bin", np.arange(sizes["bin"], dtype=np.int64), {"long_name": "entry histogram bin", "units": "1"}),
        "bin_lower": ("bin", lower, {"long_name": "lower bin edge", "units": "loss / parameter unit"}),
        "bin_upper": ("bin", upper, {"long_name": "upper bin edge", "units": "loss / parameter unit"}),
    }
    if "minibatch" in sizes:
        coords["minibatch"] = ("minibatch", np.arange(config.budget, dtype=np.int64),
                               {"long_name": "minibatch index k in the partition", "units": "1"})
    if "vector_element" in sizes:
        coords["vector_element"] = ("vector_element", np.arange(sizes["vector_element"], dtype=np.int64),
                                    {"long_name": "element of the selected parameters", "units": "1"})
    attrs = {
        "protocol": config.protocol, "reduction": config.reduction, "budget": config.budget,
        "replacement": config.replacement, "pool_size": config.pool_size, "seed": config.seed, "lr": config.lr,
        "keep": config.keep, "params": config.params, "selected": list(config.selected), "data": config.data,
        "dtype": config.dtype, "device": config.device, "trials_per_unit": config.trials_per_unit,
        "model_mode": config.model_mode, "loss": config.loss,
        "frozen": list(config.frozen), "dtype_cast": config.dtype_cast,
        "task": task_record(data=config.data, loss=config.loss, model=config.model, collate=config.collate),
        "seed_derivation": seed_derivation(config.draws), "draws": config.draws,
        "versions": json.dumps(package_versions()),
    }
    return Template(sizes=sizes, coords=coords, variables=store_variables(config), unit_dims=("checkpoint", "trial"),
                    chunks={"checkpoint": 1, "trial": config.trials_per_unit}, attrs=attrs)


