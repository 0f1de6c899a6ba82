"""Regenerate ``tests/golden/stores/`` (run only to pin a deliberate, documented change of a store):
``python -m tests.golden.write_fixtures``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.golden.make_golden import STORES, write_all
from tests.golden.snapshot import save_snapshot

FIXTURES = Path(__file__).parent / "stores"
EXTRA = ("train/runs/bs256_lr0.05_seed0_sgd/monitor.zarr",)


def fixture_name(store: str) -> str:
    return store.removesuffix(".zarr").replace("/", "__").replace(".", "_")


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        write_all(tmp)
        shutil.rmtree(FIXTURES, ignore_errors=True)
        for store in (*STORES, *EXTRA):
            save_snapshot(tmp / store, tmp, FIXTURES / fixture_name(store))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
