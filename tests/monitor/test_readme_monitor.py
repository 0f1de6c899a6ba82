"""The README's `gradlab.monitor` snippets run as written (the Lightning one where lightning imports)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[2]


def _snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## `gradlab.monitor`", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _run(code: str, cwd: Path, warnings: str = "error") -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": warnings, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_plain_loop_snippet_runs_as_written(tmp_path):
    plain, _ = _snippets()
    _run(plain, tmp_path)
    ds = xr.open_zarr(tmp_path / "run.zarr", consolidated=False)
    assert ds.sizes["step"] == 100 and np.isfinite(ds.b_noise.sel(group="all").values[10:]).all()


def test_lightning_snippet_runs_as_written(tmp_path):
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed (pip install lightning)")
    _, lightning = _snippets()
    _run(lightning, tmp_path, warnings="ignore")  # Lightning's own advice (workers, ...) is not under test
    ds = xr.open_zarr(tmp_path / "lightning.zarr", consolidated=False)
    assert list(ds.step.values) == list(range(0, 16, 2))
