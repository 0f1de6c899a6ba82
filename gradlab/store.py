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

One writer at a time: ``writer_for`` takes an ``fcntl.flock`` on the sibling file ``.<store name>.lock`` (released
by the kernel when the process dies, so a crash never leaves a stale lock) *before* it creates the store, so two
runs started at the same instant on one new ``--out`` cannot both create it: the second is refused with one line.
A run that ends without a store at its path (refused, or failed before creating it) removes the lock file while
still holding it, so it leaves nothing behind; a lock taken on a file that was removed meanwhile is taken again on
the one at the path (:func:`acquire_lock`).  An existing ``--out`` that is not a gradlab store is refused at once
(:func:`store_exists_error`); an empty folder is used as the store.
Under the lock, staging folders left by a killed creation (``.<name>.tmp-*``) are removed, and a store this run
created is removed again when the run fails before any unit is done (so the corrected rerun is not blocked).  The lock lives beside the store, not
in it: zarr warns about any foreign file inside a hierarchy.  A store may also be a group nested in another
gradlab store (``gradlab sharpness --into norms.zarr`` writes ``norms.zarr/sharpness``): its lock and its staging
folder then live beside the outermost store.  Resuming with another config is refused.

Strings are stored as variable-length UTF-8 (object dtype): fixed-width numpy strings have no zarr v3 spec yet.
Stores are written without consolidated metadata (it is not part of zarr v3); :func:`consolidate` adds it once a
command has finished a store, so that a plain ``xr.open_zarr(store)`` opens it without a warning.  A store whose
``schema_version`` is newer than this gradlab's is refused (read and write).
"""

from __future__ import annotations

import contextvars
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
_UNSET: Any = object()


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


_CRASH_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook of the crash campaign (tests/reliability): with ``GRADLAB_CRASH_AT=NAME`` or ``NAME:K`` in the
    environment, the process SIGKILLs itself the K-th time (default the first) it passes the point ``NAME``
    (``store.create``, ``store.done``, ``store.finish``, ``probe.finalize``, ``analysis.write``,
    ``analysis.finish``, ``checkpoint.write``).  Without the variable it does nothing."""
    spec = os.environ.get("GRADLAB_CRASH_AT")
    if not spec:
        return
    target, _, k = spec.partition(":")
    if target != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] == int(k or 1):
        import signal

        # GRADLAB_CRASH_SIGNAL=SIGSTOP pauses instead (the concurrency tests: a writer stopped mid-store)
        os.kill(os.getpid(), getattr(signal, os.environ.get("GRADLAB_CRASH_SIGNAL", "SIGKILL")))


# How messages name an option: "--batch-sizes" on the command line, "batch_sizes=" in the Python API
# (gradlab.api sets "api" for the duration of a call, so that every message names what its caller can change).
OPTION_STYLE: contextvars.ContextVar[str] = contextvars.ContextVar("gradlab_option_style", default="cli")
_API_NAMES = {"checkpoint": "checkpoints"}


def option(name: str, value: Any = _UNSET) -> str:
    """An option as the caller spells it: ``option("batch_sizes")`` is ``--batch-sizes`` on the command line and
    ``batch_sizes=`` in the Python API; with a value, ``--protocol frozen`` / ``protocol='frozen'`` (a flag's
    ``True``: ``--resume`` / ``resume=True``)."""
    if OPTION_STYLE.get() == "api":
        api = _API_NAMES.get(name, f"{name}=")
        if value is _UNSET:
            return api
        return f"{api.rstrip('=')}={value!r}"
    flag = "--" + name.replace("_", "-")
    if value is _UNSET or value is True:
        return flag
    return f"{flag} {value}"


def not_a_store_reason(path: str | os.PathLike) -> str | None:
    """Why an existing ``path`` is not a gradlab store that a run could continue (a file, a folder holding other
    data, a zarr store gradlab did not write), or None when it is one (or does not exist)."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return None
    if not p.is_dir():
        return "is a file, not a gradlab store"
    meta = p / "zarr.json"
    if not meta.exists():
        return "exists and is not a gradlab store (a folder without zarr.json)"
    try:
        attrs = json.loads(meta.read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return "exists and is not a gradlab store (its zarr.json is unreadable)"
    if attrs.get("gradlab_store") is None and "unit_dims" not in attrs:
        return "is a zarr store that gradlab did not write"
    return None


def store_exists_error(path: str | os.PathLike) -> StoreError:
    """The one error for an ``--out`` that already exists when no ``--resume`` was given: a gradlab store can be
    continued; anything else (a file, another folder, a foreign zarr store) cannot, and the message says so."""
    reason = not_a_store_reason(path)
    if reason is not None:
        return StoreError(f"{path} {reason}; choose another {option('out')} or remove it")
    return StoreError(f"{path} already exists; pass {option('resume', True)} to continue it, or choose another "
                      f"{option('out')}")


def is_empty_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an existing folder with nothing in it (an ``--out`` that can simply be used)."""
    p = Path(path)
    try:
        return p.is_dir() and not p.is_symlink() and not any(p.iterdir())
    except OSError:
        return False


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


def _staging_dir(path: Path) -> Path:
    """Where a store (or a group nested in one) is staged before its rename: beside the outermost store."""
    outer = _outer_store(path)
    return outer.parent if outer is not None else path.parent


def _staging_prefix(path: Path) -> str:
    p = path.absolute()
    base = _staging_dir(p)
    return "." + ".".join(p.relative_to(base).parts) + ".tmp-"


def staging_for(path: str | os.PathLike) -> Path:
    """A new, empty staging folder for ``path`` (a store or a group in one), beside the outermost store."""
    path = Path(path)
    return Path(tempfile.mkdtemp(prefix=_staging_prefix(path), dir=_staging_dir(path.absolute())))


def remove_stale_staging(path: str | os.PathLike) -> list[Path]:
    """Remove staging folders of ``path`` left by a killed run (call only while holding the store's lock).

    Also removes ``.analysis.tmp-*`` folders inside the store, which gradlab versions before 0.1 left there."""
    path = Path(path)
    base = _staging_dir(path.absolute())
    removed = []
    own = _staging_prefix(path)
    prefixes = (own, own.removesuffix(".tmp-") + ".analysis.tmp-")
    candidates = list(base.glob(".*.tmp-*")) if base.is_dir() else []
    if path.is_dir():
        candidates += list(path.glob(".analysis.tmp-*"))
    for tmp in candidates:
        if tmp.parent != base or tmp.name.startswith(prefixes):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


_LOCKS: dict[int, tuple[Path, Path]] = {}  # fd -> (lock file, store) of the locks this process holds


def acquire_lock(path: str | os.PathLike) -> int:
    """Take the store's exclusive writer lock (a non-blocking ``flock``); returns its fd.

    Raises ``StoreError`` (one line) if another process holds it.  The lock file may be removed by the holder
    when it releases it (:func:`release_lock`), so a lock taken on a file that is no longer (or no longer the
    same file) at the lock path is dropped and taken again on the file that is there."""
    path = Path(path)
    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{path} is being written by another gradlab process; wait for it to finish or choose another "
                f"{option('out')}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _LOCKS[fd] = (lp, path)
            return fd
        os.close(fd)  # the holder removed that file as it released it: lock the one at the path now
    raise StoreError(f"could not take the lock {lp} of {path}; another process keeps replacing it")


def release_lock(fd: int) -> None:
    """Release a lock taken with :func:`acquire_lock`.  When no gradlab store exists at the locked path (a refused
    run, a failed creation) the lock file is removed first, while still held, so a refused run leaves nothing
    behind; beside a store it stays."""
    lp, path = _LOCKS.pop(fd, (None, None))
    if lp is not None and (not path.exists() or not_a_store_reason(path) is not None):
        try:
            if os.fstat(fd).st_ino == os.stat(lp).st_ino:
                os.unlink(lp)
        except OSError:
            pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def check_schema(path: Path, attrs: Mapping[str, Any]) -> None:
    """Refuse a store written by a newer gradlab (its ``schema_version`` is above ours)."""
    version = attrs.get("schema_version")
    if version is None:
        return
    try:
        newer = int(version) > SCHEMA_VERSION
    except (TypeError, ValueError):
        raise StoreError(f"{path} has an unreadable schema_version {version!r}; it was not written by gradlab") \
            from None
    if newer:
        raise StoreError(f"{path} was written by a newer gradlab (store schema {version}, this gradlab reads "
                         f"schema {SCHEMA_VERSION}); update gradlab (pip install -U gradlab) to read or write it")


def consolidate(path: str | os.PathLike) -> None:
    """Write consolidated metadata into the (outermost) store, so that ``xr.open_zarr(store)`` opens quietly.

    Called when a command has finished writing; every later structural change (a new group) calls it again."""
    import warnings

    import zarr

    p = Path(path).absolute()
    root = _outer_store(p) or p
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(root))


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
    if path.exists() and not is_empty_folder(path):
        raise store_exists_error(path)
    if path.exists():
        path.rmdir()  # an empty folder: the store takes its place
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
    tmp = staging_for(path)  # a group nested in a store is staged beside the outermost store, not inside it
    try:
        target = tmp / "store.zarr"
        ds.to_zarr(target, compute=False, zarr_format=3, mode="w-", consolidated=False)
        crash_point("store.create")
        os.rename(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_store(path: str | os.PathLike, kind: str | None = None, group: str | None = None) -> Any:
    """Open a gradlab store lazily with xarray (dask-backed), checking that it is one.

    Raises ``StoreError`` naming the problem if the path is missing or not a gradlab store of ``kind``.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist; give the folder a gradlab command wrote")
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
        check_schema(path, ds.attrs)
    return ds


def store_config(ds: Any) -> dict[str, Any]:
    """The resolved config a store was made with."""
    return json.loads(ds.attrs["config"])



def config_difference(stored: Any, config: Mapping[str, Any], limit: int = 4) -> str:
    """What differs between a store's recorded config (JSON text or dict) and ``config``: 'key: old → new' for
    the first ``limit`` differing leaves (dotted paths; a checkpoint's SHA-256 shows as changed)."""
    try:
        old = json.loads(stored) if isinstance(stored, str) else dict(stored or {})
    except (TypeError, ValueError):
        return "the stored config is unreadable"
    new = json.loads(json.dumps(dict(config), default=str))

    def leaves(x: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(x, dict):
            out: dict[str, Any] = {}
            for k, v in x.items():
                out.update(leaves(v, f"{prefix}{k}."))
            return out
        if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
            out = {}
            for i, v in enumerate(x):
                out.update(leaves(v, f"{prefix}{i}."))
            return out
        return {prefix[:-1]: x}

    a, b = leaves(old), leaves(new)
    diffs = []
    for k in sorted(set(a) | set(b), key=lambda k: (k not in a or k not in b, k)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb and not (isinstance(va, float) and isinstance(vb, float) and va != va and vb != vb):
            va, vb = (repr(v if not (isinstance(v, str) and len(v) > 24) else v[:12] + "…")
                      for v in (a.get(k, "<absent>"), b.get(k, "<absent>")))
            diffs.append(f"{k}: {va} → {vb}")
    if not diffs:
        return "the same settings, another config hash"
    more = f", and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more

class StoreWriter:
    """The single writer of an existing store: region writes, the done mask, and an exclusive lock."""

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any] | None = None, *,
                 lock_fd: int | None = None) -> None:
        """Open ``path`` for writing under its lock (``lock_fd``: a lock already taken with :func:`acquire_lock`,
        which this writer then owns and releases)."""
        import zarr

        self.path = Path(path)
        self._lock_fd = acquire_lock(self.path) if lock_fd is None else lock_fd
        try:
            self.group = zarr.open_group(self.path, mode="r+", use_consolidated=False)
            attrs = self.group.attrs
            if attrs.get("gradlab_store") is None and "unit_dims" not in attrs:
                raise StoreError(f"{self.path} is a zarr store that gradlab did not write; choose another "
                                 f"{option('out')} or remove it")
            check_schema(self.path, attrs)
            if config is not None and attrs.get("config_hash") != config_hash(dict(config)):
                raise StoreError(
                    f"{self.path} was made with a different config ({config_difference(attrs.get('config'), config)});"
                    f" resume it with the same {'arguments' if OPTION_STYLE.get() == 'api' else 'flags'}, or write a "
                    f"new store with another {option('out')}"
                )
            self.unit_dims: list[str] = list(attrs["unit_dims"])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock_fd >= 0:
            release_lock(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _index(self, name: str, region: Mapping[str, int | slice]) -> tuple[int | slice, ...]:
        dims = self.group[name].metadata.dimension_names or ()  # a 0-d variable has none
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
        crash_point("store.done")


@contextmanager
def writer_for(
    path: str | os.PathLike, *, resume: bool, config: Mapping[str, Any], create: Any
) -> Iterator[StoreWriter]:
    """Create (``create()`` writes the template) or resume a store, and hold its lock while the body runs.

    The lock is taken before anything else, so of two runs started together on one new path the second is refused.
    Without ``resume`` an existing path is refused; with ``resume`` a missing store is created.  Staging folders
    left by a killed run are removed.  If this call created the store and the body fails before any unit is done,
    the store is removed again (nothing is lost: nothing was done), so a corrected rerun starts afresh.
    On success the store gets consolidated metadata (:func:`consolidate`).
    """
    path = Path(path)
    fd = acquire_lock(path)
    created = False
    try:
        remove_stale_staging(path)
        if is_empty_folder(path):  # an empty folder made for the store: simply use it
            path.rmdir()
        if path.exists():
            if not resume or not_a_store_reason(path) is not None:
                raise store_exists_error(path)
        else:
            create()
            created = True
    except BaseException:
        release_lock(fd)
        raise
    writer = StoreWriter(path, config=config, lock_fd=fd)  # owns the lock from here (releases it on failure)
    with writer:
        try:
            yield writer
        except BaseException:
            if created and not writer.done().any():
                shutil.rmtree(path, ignore_errors=True)
            raise
        crash_point("store.finish")
        consolidate(path)
