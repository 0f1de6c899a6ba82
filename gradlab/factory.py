"""Resolve user code given as ``pkg.module:factory`` (for ``--model`` and ``--data``).

Only the command line names user code: a recipe stored in a checkpoint that names code outside gradlab is never
imported unless the same factory is passed on the command line (see ``gradlab.checkpoint``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from gradlab.errors import UsageError


# Live objects handed to the Python API (gradlab.api) in this process, by their spec "live:<kind>:<name>-<digest>".
LIVE: dict[str, Callable[..., Any]] = {}


def register_live(kind: str, factory: Callable[..., Any], name: str, digest: str) -> str:
    """Register a callable built from a live object (the Python API) and return its spec ``live:KIND:NAME-DIGEST``.
    Such specs resolve in this process only (not on Dask workers of another process)."""
    spec = f"live:{kind}:{name}-{digest[:12]}"
    LIVE[spec] = factory
    return spec


def is_factory_spec(spec: str) -> bool:
    return ":" in spec


def resolve_factory(spec: str, what: str) -> Callable[..., Any]:
    """Import ``pkg.module:attr`` and return the callable, with a clear error when it cannot."""
    if spec.startswith("live:"):
        if spec not in LIVE:
            raise UsageError(f"{what} {spec!r} is a live object of another Python process; pass an importable "
                             "'pkg.module:factory' to run on Dask workers or from the command line")
        return LIVE[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{what} factory {spec!r} must look like 'pkg.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(
            f"cannot import module {module_name!r} for {what} factory {spec!r}: {exc}; make sure it is on PYTHONPATH"
        ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} (from {what} factory {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what} factory {spec!r} is not callable")
    return obj
