"""A store's content as plain arrays and JSON, with the folder it was written in replaced by ``{d}``.

Provenance (package versions, git revision, host, time) is dropped, and so are ``config_hash`` (a hash of a config
that names absolute paths), checkpoint SHA-256s (a checkpoint file records the git revision it was written at)
and the monitor's wall-clock times; everything else -- every array of every group, bit for bit, and every attribute -- is
kept, so two snapshots are equal exactly when the stores hold the same data and the same attrs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DROPPED_ATTRS = ("provenance", "versions", "config_hash", "git_revision")
# checkpoint files carry their own provenance (package versions, git revision), so their SHA-256 changes with
# every commit; the monitor's wall-clock time of each step is not a result
DROPPED_ARRAYS = ("checkpoint_sha256", "wall_time")


def _dropped(key: str) -> bool:
    return key in DROPPED_ATTRS or key.endswith("sha256")


def _norm(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(root, "{d}")
    if isinstance(value, dict):
        return {k: _norm(v, root) for k, v in value.items() if not _dropped(k)}
    if isinstance(value, list | tuple):
        return [_norm(v, root) for v in value]
    return value


def _norm_attrs(attrs: Any, root: str) -> dict[str, Any]:
    out = {}
    for k, v in dict(attrs).items():
        if _dropped(k):
            continue
        if isinstance(v, str) and v[:1] in "{[":
            try:  # JSON-in-a-string attrs (config, task): normalise inside, drop provenance-like keys
                v = json.dumps(_norm(json.loads(v), root), sort_keys=True)
            except ValueError:
                pass
        out[k] = _norm(v, root)
    return out


def snapshot(path: str | Path, root: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, attrs) of the zarr store at ``path``: arrays keyed ``group/name``; attrs keyed by group or array."""
    import zarr

    root = str(Path(root).resolve())
    arrays: dict[str, np.ndarray] = {}
    attrs: dict[str, Any] = {}

    def walk(group: Any, prefix: str) -> None:
        attrs[prefix or "/"] = _norm_attrs(group.attrs, root)
        for name, arr in sorted(group.arrays()):
            if name in DROPPED_ARRAYS:
                continue
            key = f"{prefix}{name}"
            data = np.asarray(arr[...])
            if data.dtype == object or data.dtype.kind in "UST":
                data = np.array([_norm(str(x), root) for x in data.ravel()], dtype=str).reshape(data.shape)
            arrays[key] = data
            attrs[key] = _norm_attrs(arr.attrs, root)
            attrs[key + "#meta"] = {"dtype": str(arr.dtype), "shape": list(arr.shape), "chunks": list(arr.chunks),
                                    "dims": list(arr.metadata.dimension_names or [])}
        for name, sub in sorted(group.groups()):
            walk(sub, f"{prefix}{name}/")

    walk(zarr.open_group(Path(path), mode="r", use_consolidated=False), "")
    return arrays, attrs


def save_snapshot(path: str | Path, root: str | Path, out: str | Path) -> None:
    """Write ``out.npz`` (arrays) and ``out.json`` (attrs) for the store at ``path``."""
    arrays, attrs = snapshot(path, root)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out.with_suffix(".npz"), **{k.replace("/", "__"): v for k, v in arrays.items()})
    out.with_suffix(".json").write_text(json.dumps(attrs, indent=1, sort_keys=True, default=str) + "\n")


def load_snapshot(out: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    out = Path(out)
    with np.load(out.with_suffix(".npz")) as z:
        arrays = {k.replace("__", "/"): z[k] for k in z.files}
    return arrays, json.loads(out.with_suffix(".json").read_text())
