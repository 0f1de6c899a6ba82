"""Where ``gradlab analyze`` writes: the ``--out`` folder (claimed before anything is written, so a user's own files
are never overwritten), ``summary.json`` (atomically) and the store's ``analysis`` group (staged beside the store,
then renamed into place, under the store's writer lock)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from gradlab.errors import StoreError, UsageError

ANALYSIS_GROUP = "analysis"
OUT_MARKER = ".gradlab-analysis"


def default_out_dir(path: str | os.PathLike) -> Path:
    """``norms.zarr`` → ``norms-analysis`` next to it."""
    p = Path(path).resolve()
    return p.with_name(p.name.removesuffix(".zarr") + "-analysis")


def remove_old_staging(path: Path) -> None:
    """Remove the staging folders a killed analyze left (inside the store: older gradlab; beside it: this one),
    unless a writer holds the store's lock."""
    from gradlab.store import acquire_lock, release_lock, remove_stale_staging

    try:
        fd = acquire_lock(path)
    except StoreError:
        return  # a writer is at work: leave everything as it is
    try:
        remove_stale_staging(path)
    finally:
        release_lock(fd)


def claim_out_dir(out: Path) -> None:
    """Make ``out`` gradlab analyze's folder, or refuse it: a new or empty folder gets a marker file; a folder
    holding other data (no marker, and no ``summary.json`` written by gradlab) is refused before anything is
    written, so a user's own files are never overwritten."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new, empty, or an earlier gradlab analyze output)")
    if out.is_dir() and not (out / OUT_MARKER).exists() and any(out.iterdir()):
        if not _gradlab_summary(out / "summary.json"):
            raise UsageError(f"{out} holds other data (not an earlier gradlab analyze output); choose an empty or "
                             "new folder for --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUT_MARKER).touch()


def _gradlab_summary(path: Path) -> bool:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "gradlab_store" in d and "store" in d


def write_analysis_group(path: Path, ads: Any) -> None:
    """Write ``ads`` as the store's ``analysis`` group: beside the store first, then renamed into place.

    Holds the store's writer lock, so it refuses (``StoreError``) while gradlab probe is still writing.
    """
    from gradlab.store import StoreWriter, consolidate, crash_point, remove_stale_staging, staging_for

    with StoreWriter(path):
        remove_stale_staging(path)  # left by a killed analyze
        final = path / ANALYSIS_GROUP
        tmp = staging_for(final)  # beside the store: nothing foreign ever lives inside the hierarchy
        try:
            target = tmp / ANALYSIS_GROUP
            ads.to_zarr(target, mode="w", zarr_format=3, consolidated=False)
            crash_point("analysis.write")
            if final.exists():
                old = tmp / "old"
                os.rename(final, old)
                crash_point("analysis.write")  # between the two renames: no analysis group for an instant
            os.rename(target, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        crash_point("analysis.finish")
        consolidate(path)


def write_summary(out: Path, result: dict[str, Any]) -> None:
    """``out/summary.json`` (JSON-safe, no NaN), written beside and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".summary.json.tmp"
    from gradlab.analysis.output import jsonable

    tmp.write_text(json.dumps(jsonable(result), indent=2, allow_nan=False, ensure_ascii=False))
    os.replace(tmp, out / "summary.json")
