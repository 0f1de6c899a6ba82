"""`gradlab analyze` on stores a user can make that the laws cannot be fitted on: one line and exit 2, no traceback."""

from __future__ import annotations

import pytest

from gradlab.cli import main
from gradlab.synthetic import write_synthetic_store


@pytest.mark.parametrize("protocol", ["frozen", "step"])
def test_one_batch_size_exits_2_with_one_line(tmp_path, capsys, protocol):
    path = tmp_path / "one.zarr"
    write_synthetic_store(path, protocol=protocol, batch_sizes=(4,), budget=16, trials=6, seed=0)
    assert main(["analyze", str(path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one batch size (m = 4)" in err and "--batch-sizes" in err
