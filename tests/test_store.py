"""The resumable store mechanism: atomic template, region writes, done mask, lock, config check."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.errors import StoreError
from gradlab.store import StoreWriter, VarSpec, create_store, lock_path, open_store, writer_for


def _make(path, config=None):
    create_store(
        path, kind="test", sizes={"unit": 4, "x": 3},
        coords={"unit": ("unit", np.arange(4), {"long_name": "unit"}), "name": ("x", ["a", "b", "c"], {})},
        variables=[VarSpec("v", ("unit", "x"), "float64", "a value", "m"),
                   VarSpec("n", ("unit",), "int32", "a count", "count")],
        unit_dims=("unit",), chunks={"unit": 1}, config=config or {"a": 1},
    )


def test_template_opens_with_fill_values_and_attrs(tmp_path):
    _make(tmp_path / "s.zarr")
    ds = open_store(tmp_path / "s.zarr", kind="test")
    assert np.isnan(ds.v.values).all() and (ds.n.values == 0).all() and not ds.done.values.any()
    assert ds.v.attrs == {"long_name": "a value", "units": "m"}
    assert "git_revision" in ds.attrs["provenance"] and ds.attrs["config"] == '{"a":1}'
    assert list(ds.name.values) == ["a", "b", "c"]


def test_region_writes_and_done_mask(tmp_path):
    _make(tmp_path / "s.zarr")
    with StoreWriter(tmp_path / "s.zarr", config={"a": 1}) as w:
        w.write("v", {"unit": 2}, [1.0, 2.0, 3.0])
        w.mark_done({"unit": 2})
        assert w.done().tolist() == [False, False, True, False]
    ds = open_store(tmp_path / "s.zarr")
    assert ds.v.values[2].tolist() == [1.0, 2.0, 3.0] and np.isnan(ds.v.values[1]).all()


def test_second_writer_is_refused_while_first_holds_lock(tmp_path):
    _make(tmp_path / "s.zarr")
    with StoreWriter(tmp_path / "s.zarr"):
        with pytest.raises(StoreError, match="another gradlab process"):
            StoreWriter(tmp_path / "s.zarr")
    StoreWriter(tmp_path / "s.zarr").close()  # released afterwards
    assert lock_path(tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr" / ".s.zarr.lock").exists()


def test_resume_with_other_config_is_refused(tmp_path):
    _make(tmp_path / "s.zarr", {"a": 1})
    with pytest.raises(StoreError, match="different config"):
        StoreWriter(tmp_path / "s.zarr", config={"a": 2})


def test_existing_store_without_resume_is_refused(tmp_path):
    _make(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="--resume"):
        with writer_for(tmp_path / "s.zarr", resume=False, config={"a": 1}, create=lambda: None):
            pass


def test_failed_template_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        create_store(tmp_path / "s.zarr", kind="t", sizes={"u": 2}, coords={},
                     variables=[VarSpec("v", ("u", "missing"), "float64", "v", "1")], unit_dims=("u",), chunks={},
                     config={})
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(StoreError, match="not a zarr v3 store"):
        open_store(tmp_path / "x")
