"""Resumable zarr v3 stores: template first, then chunk-aligned region writes, then a done mask.

Every gradlab store (train runs, probes, sharpness) is one zarr v3 group that ``xarray.open_zarr`` reads.  It is
written in three phases so that a crash at any moment -- ``kill -9`` included -- leaves a store that opens and
resumes to exactly what an uninterrupted run writes:

1. ``create_store`` writes the whole template (coordinates, attrs, every variable filled with its fill value)
   into a temporary folder and renames it into place: a store either exists completely or not at all.
2. Workers write results with ``StoreWriter.write`` into regions aligned with the chunks of the *unit* dims
   (zarr writes each chunk as temp file + rename, so a chunk is either old or new).
3. After all variables of a unit are written, ``StoreWriter.mark_done`` sets the unit's entries of ``done``.
   Resume recomputes every unit whose ``done`` is False; a unit's results depend only on its coordinates and
   the seed, so recomputing it writes the same bytes.

One writer at a time: ``StoreWriter`` holds an ``fcntl.flock`` on the sibling file ``.<store name>.lock`` (released
by the kernel when the process dies, so a crash never leaves a stale lock).  The lock lives beside the store, not
in it: zarr warns about any foreign file inside a hierarchy.  A store may also be a group nested in another
gradlab store (``gradlab sharpness --into norms.zarr`` writes ``norms.zarr/sharpness``): its lock and its staging
folder then live beside the outermost store.  Resuming with another config is refused.

Strings are stored as variable-length UTF-8 (object dtype): fixed-width numpy strings have no zarr v3 spec yet.
Consolidated metadata is off (it is not part of zarr v3); open stores with :func:`open_store`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import StoreError
from gradlab.provenance import canonical_json, config_hash, provenance

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class VarSpec:
    """One stored variable: its dims, dtype, fill value and self-describing attrs."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    long_name: str
    units: str
    fill: Any = None  # None: NaN for floats, 0 for ints, False for bools
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def fill_value(self) -> Any:
        if self.fill is not None:
            return self.fill
        kind = np.dtype(self.dtype).kind
        return np.nan if kind in "fc" else (False if kind == "b" else 0)


def _outer_store(path: Path) -> Path | None:
    """The outermost zarr store strictly containing ``path`` (a group inside a store), or None."""
    outer = None
    for parent in path.absolute().parents:
        if (parent / "zarr.json").exists():
            outer = parent
        else:
            break
    return outer


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a store: ``.<name>.lock`` beside it; for a group nested in a store (``a.zarr/sharpness``)
    ``.a.zarr.sharpness.lock`` beside the outermost store, since no foreign file may live inside a hierarchy."""
    p = Path(path).absolute()
    outer = _outer_store(p)
    base = outer.parent if outer is not None else p.parent
    return base / ("." + ".".join(p.relative_to(base).parts) + ".lock")


def _object_strings(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    return arr.astype(object) if arr.dtype.kind in "US" else arr


def create_store(
    path: str | os.PathLike,
    *,
    kind: str,
    sizes: Mapping[str, int],
    coords: Mapping[str, tuple[Sequence[str] | str, Any, Mapping[str, Any]]],
    variables: Sequence[VarSpec],
    unit_dims: Sequence[str],
    chunks: Mapping[str, int],
    config: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write the template of a store atomically (temp folder + rename).

    ``sizes`` gives every dim's length; ``coords`` maps a name to ``(dims, values, attrs)``; ``unit_dims`` are the
    dims of the ``done`` mask (one unit = one chunk-aligned block along them); ``chunks`` gives chunk lengths
    (dims not named are one chunk).  ``config`` is the resolved config: stored as JSON with its hash, so that a
    resume with another config can be refused.
    """
    import dask.array as da
    import xarray as xr

    path = Path(path)
    if path.exists():
        raise StoreError(f"{path} already exists; pass --resume to continue it, or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)

    def chunk_of(dims: Sequence[str]) -> tuple[int, ...]:
        return tuple(min(chunks.get(d, sizes[d]), sizes[d]) or 1 for d in dims)

    data_vars: dict[str, Any] = {}
    for v in [*variables, VarSpec("done", tuple(unit_dims), "bool", "unit finished", "1")]:
        missing = [d for d in v.dims if d not in sizes]
        if missing:
            raise ValueError(f"variable {v.name!r} uses dims {missing} that have no size")
        shape = tuple(sizes[d] for d in v.dims)
        arr = da.full(shape, v.fill_value(), dtype=v.dtype, chunks=chunk_of(v.dims))
        data_vars[v.name] = (v.dims, arr, {"long_name": v.long_name, "units": v.units, **dict(v.attrs)})
    xr_coords = {name: (dims, _object_strings(values), dict(cattrs)) for name, (dims, values, cattrs) in coords.items()}
    ds = xr.Dataset(data_vars, coords=xr_coords)
    cfg = dict(config)
    ds.attrs.update(
        {
            "gradlab_store": kind,
            "schema_version": SCHEMA_VERSION,
            "config": canonical_json(cfg),
            "config_hash": config_hash(cfg),
            "unit_dims": list(unit_dims),
            "provenance": json.dumps(provenance()),
            **(dict(attrs) if attrs else {}),
        }
    )
    outer = _outer_store(path)  # a group nested in a store is staged beside the outermost store, not inside it
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=(outer.parent if outer is not None else path.parent)))
    try:
        target = tmp / "store.zarr"
        ds.to_zarr(target, compute=False, zarr_format=3, mode="w-", consolidated=False)
        os.rename(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_store(path: str | os.PathLike, kind: str | None = None, group: str | None = None) -> Any:
    """Open a gradlab store lazily with xarray (dask-backed), checking that it is one.

    Raises ``StoreError`` naming the problem if the path is missing or not a gradlab store of ``kind``.
    """
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a zarr v3 store (no zarr.json); give the folder written by gradlab")
    try:
        ds = xr.open_zarr(path, consolidated=False, group=group)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and the cause
        raise StoreError(f"could not open {path}{'/' + group if group else ''} with xarray: {exc}") from exc
    if group is None:
        found = ds.attrs.get("gradlab_store")
        if found is None:
            raise StoreError(f"{path} is a zarr store but not a gradlab store (no 'gradlab_store' attr)")
        if kind is not None and found != kind:
            raise StoreError(f"{path} is a gradlab {found!r} store, expected a {kind!r} store")
    return ds


def store_config(ds: Any) -> dict[str, Any]:
    """The resolved config a store was made with."""
    return json.loads(ds.attrs["config"])


class StoreWriter:
    """The single writer of an existing store: region writes, the done mask, and an exclusive lock."""

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> None:
        import zarr

        self.path = Path(path)
        self._lock_fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreError(
                f"{self.path} is being written by another gradlab process; wait for it to finish or choose "
                "another --out"
            ) from None
        self.group = zarr.open_group(self.path, mode="r+")
        if config is not None:
            stored = self.group.attrs.get("config_hash")
            if stored != config_hash(dict(config)):
                self.close()
                raise StoreError(
                    f"{self.path} was made with a different config; resume it with the same flags, or write a new "
                    f"store with another --out (stored config: {self.group.attrs.get('config')})"
                )
        self.unit_dims: list[str] = list(self.group.attrs["unit_dims"])

    def close(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _index(self, name: str, region: Mapping[str, int | slice]) -> tuple[int | slice, ...]:
        dims = self.group[name].metadata.dimension_names
        unknown = set(region) - set(dims)
        if unknown:
            raise ValueError(f"region dims {sorted(unknown)} are not dims of {name!r} {dims}")
        return tuple(region.get(d, slice(None)) for d in dims)

    def write(self, name: str, region: Mapping[str, int | slice], values: Any) -> None:
        """Write ``values`` into ``name`` at ``region`` (a dict dim -> int or slice; other dims whole)."""
        self.group[name][self._index(name, region)] = np.asarray(values)

    def read(self, name: str, region: Mapping[str, int | slice] | None = None) -> np.ndarray:
        return np.asarray(self.group[name][self._index(name, region or {})])

    def done(self) -> np.ndarray:
        return np.asarray(self.group["done"][...])

    def mark_done(self, region: Mapping[str, int | slice]) -> None:
        """Mark a unit finished; call only after every variable of the unit is written."""
        self.write("done", region, True)


@contextmanager
def writer_for(
    path: str | os.PathLike, *, resume: bool, config: Mapping[str, Any], create: Any
) -> Iterator[StoreWriter]:
    """Create (``create()`` writes the template) or resume a store, and hold its lock while the body runs.

    Without ``resume`` an existing path is refused; with ``resume`` a missing store is created.
    """
    path = Path(path)
    if path.exists():
        if not resume:
            raise StoreError(f"{path} already exists; pass --resume to continue it, or choose another --out")
        if not (path / "zarr.json").exists():
            raise StoreError(f"{path} exists but is not a gradlab store; choose another --out")
    else:
        create()
    with StoreWriter(path, config=config) as writer:
        yield writer
