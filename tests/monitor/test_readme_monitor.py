"""The README's `gradlab.monitor` snippets run as written (the Lightning one where lightning imports)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[2]


def _snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## `gradlab.monitor`", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_plain_loop_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    plain, _ = _snippets()
    monkeypatch.chdir(tmp_path)
    exec(compile(plain, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
    ds = xr.open_zarr(tmp_path / "run.zarr", consolidated=False)
    assert ds.sizes["step"] == 100 and np.isfinite(ds.b_noise.sel(group="all").values[10:]).all()
    assert capsys.readouterr().out.strip()


@pytest.mark.filterwarnings("ignore")  # Lightning's own advice (workers, loggers) is not under test
def test_lightning_snippet_runs_as_written(tmp_path, monkeypatch):
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed (pip install lightning)")
    _, lightning = _snippets()
    monkeypatch.chdir(tmp_path)
    exec(compile(lightning, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    ds = xr.open_zarr(tmp_path / "lightning.zarr", consolidated=False)
    assert list(ds.step.values) == list(range(0, 16, 2))
