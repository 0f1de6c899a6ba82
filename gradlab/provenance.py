"""Provenance recorded in every store and checkpoint: package versions, git revision, platform."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("gradlab", "torch", "numpy", "scipy", "xarray", "zarr", "dask", "seaborn")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour shapes gradlab's numbers."""
    out: dict[str, str] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision() -> str:
    """The git revision of the gradlab source tree (with ``-dirty`` if modified), or ``unknown``."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, Any]:
    """Everything a store records about how it was made, besides its own config and seeds."""
    return {
        "versions": package_versions(),
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
    }


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved config (used to refuse resuming with a different config)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]
