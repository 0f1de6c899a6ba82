"""The monitor store: one zarr v3 group per training run, appended along ``step`` in chunks (numpy + zarr only).

Dims: ``step`` (the optimizer step index t of a recorded step; grows), ``layer`` (one entry per parameter tensor,
coords ``param_kind`` weight/bias and ``layer_size``), ``group`` (``all``, ``weight``, ``bias``).  Variables are
listed by :func:`monitor_variables`; per-tensor variants carry the suffix ``_layer`` (as in the probe and train
stores).  Root attrs: ``gradlab_store = "monitor"``, ``schema_version``, ``config`` (JSON) and ``config_hash``,
``provenance`` (JSON), ``task`` (JSON: loss name and source sha256, model class), ``estimator``, ``sampling``,
``smoothing``, ``interval``, ``every``, ``chunk_steps``, ``fallback_params``, ``excluded_params``, ``notes``.

Appending (:meth:`MonitorStore.append`) writes the new rows' chunk files of every variable first (each file is
written to a temporary name and renamed: a chunk is old or new, never torn), beyond the arrays' visible length,
then extends each array's length (its ``zarr.json``, also written by rename), and last commits the append: the
root ``zarr.json``, rewritten by one rename, carries consolidated metadata holding every array's length.  That one
file is the store's commit record.  Each array's own ``zarr.json`` is a separate file, so no set of them changes
at once: a kill inside the metadata updates of an append leaves some arrays extended and others not, while the
root still holds the lengths of the last committed append, equal for every array.  A plain ``xr.open_zarr(path)``
(which reads consolidated metadata when a store has it) therefore opens a store at any moment, during training
and after a kill anywhere, at its last committed append, every array at the same length; so does
:func:`open_monitor`.  Only a reader that skips the commit record, ``xr.open_zarr(path, consolidated=False)``, can
meet arrays of different lengths (after a kill inside those milliseconds of metadata updates); resuming
(``NoiseMonitor(resume=True)``) first sets every array back to the committed length.  Readers see whole appends
only.
"""

from __future__ import annotations

import logging
import fcntl
import json
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.errors import StoreError
from gradlab.provenance import canonical_json, config_hash, provenance
from gradlab.schema import GROUPS
from gradlab.schema.monitor import MISSING, SQ, monitor_variables  # noqa: F401 - the public names
from gradlab.store import SCHEMA_VERSION

KIND = "monitor"

log = logging.getLogger("gradlab.monitor.monitor")


def lock_file(path: Path) -> Path:
    p = path.absolute()
    return p.parent / f".{p.name}.lock"


def _is_monitor_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("attributes", {}).get("gradlab_store") == KIND


class MonitorStore:
    """The single writer of a monitor store: create or reopen, truncate for resume, append rows, lock."""

    def __init__(self, path: str | os.PathLike, *, layers: Sequence[str], kinds: Sequence[str],
                 sizes: Sequence[int], config: Mapping[str, Any], attrs: Mapping[str, Any], chunk_steps: int,
                 resume: bool) -> None:
        import zarr

        self.path = Path(path)
        self.chunk_steps = int(chunk_steps)
        self.vars = {v.name: v for v in monitor_variables()}
        self._root_lock = threading.Lock()  # the root zarr.json: attrs (training thread), commits (append thread)
        self._root: dict[str, Any] | None = None
        exists = self.path.exists()
        if exists and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # an empty folder made beforehand holds nothing: the store is created there
            exists = False
        if exists and not _is_monitor_store(self.path):
            raise StoreError(f"{self.path} holds other data, not a gradlab monitor store; choose a new store path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _acquire(lock_file(self.path), self.path)  # a live writer is refused here
        except OSError as exc:
            raise StoreError(f"cannot write a monitor store at {self.path} ({exc.strerror or exc}); choose a path "
                             "in a writable folder") from None
        try:
            if exists and not resume:
                if committed_length(self.path) > 0:
                    raise StoreError(f"{self.path} already holds a gradlab monitor store; pass resume=True to "
                                     "continue it, or choose a new store path")
                import shutil  # no step recorded (a first loss() that failed, say): nothing to keep; start afresh

                shutil.rmtree(self.path)
                exists = False
            if not exists:
                self._create(layers, kinds, sizes, config, attrs)
            self.created = not exists
            self.group = zarr.open_group(self.path, mode="r+", use_consolidated=False)
            if exists:
                stored = self.group.attrs.get("config_hash")
                if stored != config_hash(dict(config)):
                    raise StoreError(f"{self.path} was recorded with another monitor config; resume with the same "
                                     f"settings or choose a new store path (stored: {self.group.attrs.get('config')})")
                stored_chunk = int(self.group.attrs.get("chunk_steps", self.chunk_steps))
                if stored_chunk != self.chunk_steps:  # the store's chunk grid decides (a resume may not pass it)
                    log.info("NoiseMonitor: %s is chunked by %d steps: resumed with chunk_steps=%d, not %d",
                             self.path, stored_chunk, stored_chunk, self.chunk_steps)
                    self.chunk_steps = stored_chunk
                have = [str(x) for x in self.group["layer"][...]]
                if have != list(layers):
                    raise StoreError(f"{self.path} was recorded for parameters {have[:4]}…, not this model's "
                                     f"{list(layers)[:4]}…; choose a new store path")
            self.arrays = {name: self.group[name] for name in [*self.vars, "step"]}
            self._meta = {name: json.loads((self.path / name / "zarr.json").read_text()) for name in self.arrays}
            self._codecs = {name: _codec_of(meta) for name, meta in self._meta.items()}
            self.length = committed_length(self.path)
            for name, meta in self._meta.items():  # a kill inside an append's metadata updates: back to the commit
                if meta["shape"][0] != self.length:
                    self._set_length(name, self.length)
            self.commit(rescan=True)
        except BaseException:
            self.close()
            raise

    # -- creation -----------------------------------------------------------------------------------------
    def _create(self, layers: Sequence[str], kinds: Sequence[str], sizes: Sequence[int],
                config: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
        import shutil
        import tempfile

        import xarray as xr

        data_vars, enc = {}, {}
        n = {"group": len(GROUPS), "layer": len(layers)}
        for v in self.vars.values():
            shape = tuple(0 if d == "step" else n[d] for d in v.dims)
            data_vars[v.name] = (v.dims, np.zeros(shape, dtype=v.dtype),
                                 {"long_name": v.long_name, "units": v.units, **dict(v.attrs)})
            enc[v.name] = {"chunks": tuple(self.chunk_steps if d == "step" else max(n[d], 1) for d in v.dims)}
        coords = {
            "step": ("step", np.zeros(0, dtype=np.int64), {"long_name": "optimizer step t", "units": "steps"}),
            "layer": ("layer", np.asarray(list(layers), dtype=object), {"long_name": "parameter tensor"}),
            "param_kind": ("layer", np.asarray(list(kinds), dtype=object), {"long_name": "parameter kind"}),
            "layer_size": ("layer", np.asarray(list(sizes), dtype=np.int64), {"long_name": "entries", "units": "1"}),
            "group": ("group", np.asarray(GROUPS, dtype=object), {"long_name": "parameter group"}),
        }
        enc["step"] = {"chunks": (self.chunk_steps,)}
        ds = xr.Dataset(data_vars, coords=coords)
        cfg = dict(config)
        ds.attrs.update({"gradlab_store": KIND, "schema_version": SCHEMA_VERSION, "config": canonical_json(cfg),
                         "config_hash": config_hash(cfg), "provenance": json.dumps(provenance()),
                         "chunk_steps": self.chunk_steps, **{k: _attr(v) for k, v in attrs.items()}})
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        try:
            ds.to_zarr(tmp / "store.zarr", zarr_format=3, consolidated=False, encoding=enc, mode="w-")
            os.rename(tmp / "store.zarr", self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """The first ``length`` rows of a step variable (or the step coordinate)."""
        import zarr

        return np.asarray(zarr.open_array(self.path / name, mode="r")[: self.length])

    # -- writing ------------------------------------------------------------------------------------------
    def truncate(self, length: int) -> None:
        """Make every step array ``length`` long (resume: drop steps recorded after the checkpoint), committed.
        Chunk files beyond it stay until overwritten: they are outside every array's shape, so nothing reads
        them (and a kill before the commit leaves the old length, whose chunks are all still there)."""
        for name in self.arrays:
            self._set_length(name, length)
        self.length = length
        self.commit()

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append ``rows`` (name -> array with a leading axis of r new steps; ``step`` included).

        Chunk data first (beyond the visible length), then each array's length, then the commit (the root
        ``zarr.json``): see the module docstring.
        """
        r = int(np.asarray(rows["step"]).shape[0])
        if r == 0:
            return
        unknown = set(rows) - set(self.arrays)
        if unknown:
            raise ValueError(f"unknown monitor variables {sorted(unknown)}")
        n0, n1 = self.length, self.length + r
        for name, arr in self.arrays.items():
            if name in rows:
                values = np.asarray(rows[name], dtype=arr.dtype)
            else:
                values = np.full((r, *arr.shape[1:]), self._fill(name), dtype=arr.dtype)
            self._write_rows(name, n0, values)
        for name in self.arrays:
            self._set_length(name, n1)
        self.length = n1
        self.commit()

    def _fill(self, name: str) -> Any:
        return self.vars[name].fill_value() if name in self.vars else 0

    def _write_rows(self, name: str, n0: int, values: np.ndarray) -> None:
        """Write rows n0.. of ``name``: whole chunks, each to a temporary file renamed into place."""
        arr = self.arrays[name]
        k = self.chunk_steps
        n1 = n0 + values.shape[0]
        c0 = n0 // k
        if n0 % k:  # the visible partial chunk: its rows are rewritten together with the new ones
            head = self._get_chunk(name, (c0, *([0] * (arr.ndim - 1))))[: n0 - c0 * k]
            values = np.concatenate([head, values])
        start = c0 * k
        for c in range(c0, (n1 - 1) // k + 1):
            rows = values[c * k - start:(c + 1) * k - start]
            chunk = np.full((k, *arr.shape[1:]), self._fill(name), dtype=arr.dtype)
            chunk[: rows.shape[0]] = rows
            self._put_chunk(name, (c, *([0] * (arr.ndim - 1))), chunk)

    def _get_chunk(self, name: str, index: tuple[int, ...]) -> np.ndarray:
        """A whole chunk of ``name``, decoded here (no zarr call: this also runs at interpreter exit, when zarr's
        thread pool takes no new work)."""
        arr = self.arrays[name]
        k = self.chunk_steps
        codec = self._codecs[name]
        if codec is None:  # an unexpected codec pipeline: let zarr decode
            import zarr

            return np.asarray(zarr.open_array(self.path / name, mode="r")[index[0] * k:(index[0] + 1) * k])
        target = self.path / name / "c" / "/".join(str(i) for i in index)
        shape = (k, *arr.shape[1:])
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            return np.full(shape, self._fill(name), dtype=arr.dtype)
        if codec != "raw":
            data = codec.decode(data)
        return np.frombuffer(data, dtype=arr.dtype.newbyteorder("<")).reshape(shape).astype(arr.dtype)

    def _put_chunk(self, name: str, index: tuple[int, ...], chunk: np.ndarray) -> None:
        codec = self._codecs[name]
        if codec is None:  # an unexpected codec pipeline: let zarr encode (slower, same result)
            import zarr

            arr = self.arrays[name]
            aa = arr._async_array
            big_shape = (max(arr.shape[0], (index[0] + 1) * self.chunk_steps), *arr.shape[1:])
            big = zarr.Array(zarr.AsyncArray(metadata=aa.metadata.update_shape(big_shape),
                                             store_path=aa.store_path, config=aa.config))
            k = self.chunk_steps
            big[index[0] * k:(index[0] + 1) * k] = chunk
            return
        data = np.ascontiguousarray(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False)).tobytes()
        if codec != "raw":
            data = codec.encode(data)
        target = self.path / name / "c" / "/".join(str(i) for i in index)
        _atomic_write(target, bytes(data))

    def _set_length(self, name: str, n: int) -> None:
        meta = self._meta[name]
        meta["shape"][0] = int(n)
        _atomic_write(self.path / name / "zarr.json", json.dumps(meta, indent=2).encode())

    def commit(self, rescan: bool = False) -> None:
        """Write the root ``zarr.json`` with consolidated metadata holding every array's current length: the
        commit record of the appends so far (one rename).  ``rescan`` builds that metadata from the store's files
        first (zarr's own consolidation: at opening, once the ``init`` group exists, and at close); otherwise the
        cached copy is written with the step arrays' current metadata."""
        with self._root_lock:
            if rescan or self._root is None:
                import zarr

                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                    zarr.consolidate_metadata(str(self.path))
                self._root = json.loads((self.path / "zarr.json").read_text())
                return
            members = self._root["consolidated_metadata"]["metadata"]
            for name, meta in self._meta.items():  # copies: an attrs write meanwhile keeps the committed lengths
                members[name] = {**meta, "shape": list(meta["shape"])}
            self._write_root()

    def _write_root(self) -> None:
        _atomic_write(self.path / "zarr.json", json.dumps(self._root, indent=2, default=_json_default).encode())

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Update root attrs (written with the commit record's current lengths, by one rename)."""
        with self._root_lock:
            self._root["attributes"].update({k: _attr(v) for k, v in attrs.items()})
            self._write_root()

    def add_note(self, note: str, **attrs: Any) -> None:
        """Append ``note`` to the store's ``notes`` attr (and set ``attrs`` with it)."""
        self.set_attrs({**attrs, "notes": [*self.json_attr("notes", []), note]})

    def json_attr(self, name: str, default: Any) -> Any:
        """A root attr that :meth:`set_attrs` stored as JSON text (dicts, lists of numbers), decoded."""
        with self._root_lock:
            raw = self._root["attributes"].get(name, default)
        return json.loads(raw) if isinstance(raw, str) else raw

    def consolidate(self) -> None:
        """Consolidated metadata once the run has written everything, as every gradlab store has at its end (the
        monitor's has had it since its creation: its commit record, current), and that of an enclosing zarr store
        if the monitor's lies inside one."""
        from gradlab.store import _outer_store, consolidate

        self.commit()
        if _outer_store(self.path) is not None:
            consolidate(self.path)

    def close(self) -> None:
        if getattr(self, "_lock_fd", -1) >= 0:
            try:  # the lock file goes with the lock (a writer that opened it meanwhile sees it gone: _acquire)
                os.unlink(lock_file(self.path))
            except OSError:
                pass
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1


def _acquire(lock: Path, store: Path) -> int:
    """An exclusive flock on ``lock`` (created if missing), refused at once if another writer holds it.  The lock
    file is removed at close, so a lock taken on a file that was unlinked meanwhile is retried on the new one."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{store} is being written by another process; stop it or choose a new store "
                             "path") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _codec_of(meta: Mapping[str, Any]) -> Any:
    """"raw" or a numcodecs Zstd for the pipelines xarray writes ([bytes little-endian] (+ zstd)); None otherwise."""
    codecs = meta.get("codecs", [])
    enc = meta.get("chunk_key_encoding", {})
    if enc.get("name") != "default" or enc.get("configuration", {}).get("separator", "/") != "/":
        return None
    if not codecs or codecs[0].get("name") != "bytes" or \
            codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    if len(codecs) == 1:
        return "raw"
    if len(codecs) == 2 and codecs[1].get("name") == "zstd":
        from numcodecs import Zstd

        cfg = codecs[1].get("configuration", {})
        return Zstd(level=int(cfg.get("level", 0)), checksum=bool(cfg.get("checksum", False)))
    return None


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _attr(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)) and not (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)):
        return json.dumps(v, default=str)
    return list(v) if isinstance(v, tuple) else v


def consistent_length(group: Any) -> int:
    """The number of steps every step array holds (the minimum of their lengths)."""
    lengths = [group[name].shape[0] for name, arr in group.arrays() if "step" in (arr.metadata.dimension_names or ())
               and (arr.metadata.dimension_names or ())[0] == "step"]
    return int(min(lengths)) if lengths else 0


def _committed(path: Path) -> int | None:
    """The step count of the store's commit record (its consolidated metadata), or None if it has none."""
    try:
        root = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    members = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    lengths = [m["shape"][0] for k, m in members.items() if "/" not in k and m.get("node_type") == "array"
               and (m.get("dimension_names") or [None])[0] == "step"]
    return int(min(lengths)) if lengths else None


def committed_length(path: str | os.PathLike) -> int:
    """The number of steps of the last committed append: from the root's consolidated metadata (the commit
    record), or, for a store without one (written live by an older gradlab), the length every array has reached."""
    import zarr

    n = _committed(Path(path))
    if n is not None:
        return n
    return consistent_length(zarr.open_group(Path(path), mode="r", use_consolidated=False))


def open_monitor(path: str | os.PathLike, retries: int = 20) -> Any:
    """Open a monitor store with xarray (lazily), also while it is being written or after a crash.

    The store's last committed append, as a plain ``xr.open_zarr(path)`` reads it (the module docstring); a store
    without a commit record (written live, or killed, by an older gradlab) is read at the common length of its
    arrays, also when caught between the metadata updates of an append.
    """
    import xarray as xr
    import zarr

    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p} does not exist; give the store path of a NoiseMonitor")
    if not (p / "zarr.json").exists():
        raise StoreError(f"{p} is not a zarr v3 store (no zarr.json); give the store path of a NoiseMonitor")
    if not _is_monitor_store(p):
        raise StoreError(f"{p} is not a gradlab monitor store")
    if _committed(p) is not None:
        return xr.open_zarr(p, consolidated=True)
    for attempt in range(retries):
        try:
            return xr.open_zarr(p, consolidated=False)
        except ValueError as exc:
            if "conflicting sizes" not in str(exc) and "size" not in str(exc):
                raise
            time.sleep(0.05)
    import dask.array as da

    group = zarr.open_group(p, mode="r", use_consolidated=False)
    n = consistent_length(group)
    ds = xr.Dataset(attrs=dict(group.attrs))
    for name, arr in group.arrays():
        dims = tuple(arr.metadata.dimension_names)
        data = da.from_zarr(arr)
        if dims and dims[0] == "step":
            data = data[:n]
        attrs = {k: v for k, v in arr.attrs.items() if k != "_FillValue"}
        ds[name] = (dims, data, attrs)
    return ds.set_coords([c for c in ("step", "layer", "param_kind", "layer_size", "group") if c in ds])
