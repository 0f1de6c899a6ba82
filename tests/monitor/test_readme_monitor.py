"""The README's `gradlab.monitor` snippets run as written (Lightning's and Hugging Face's where they import)."""

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
    plain = _snippets()[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(plain, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
    ds = xr.open_zarr(tmp_path / "run.zarr", consolidated=False)
    assert ds.sizes["step"] == 100 and np.isfinite(ds.b_noise.sel(group="all").values[10:]).all()
    assert capsys.readouterr().out.strip()


@pytest.mark.filterwarnings("ignore")  # Lightning's own advice (workers, loggers) is not under test
def test_lightning_snippet_runs_as_written(tmp_path, monkeypatch):
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed (pip install lightning)")
    lightning = _snippets()[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(lightning, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    ds = xr.open_zarr(tmp_path / "lightning.zarr", consolidated=False)
    assert list(ds.step.values) == list(range(0, 16, 2))


@pytest.mark.filterwarnings("ignore")  # the Trainer's own advice (no GPU, deprecations) is not under test
def test_hugging_face_snippet_runs_as_written(tmp_path, monkeypatch):
    for mod in ("transformers", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install transformers accelerate)")
    hf = _snippets()[2]
    monkeypatch.chdir(tmp_path)
    exec(compile(hf, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    ds = xr.open_zarr(tmp_path / "hf.zarr", consolidated=False)
    assert list(ds.step.values) == list(range(0, 16, 2)) and (ds.missing.values == 0).all()
    assert np.isfinite(ds.b_noise.sel(group="all").values[1:]).all()
