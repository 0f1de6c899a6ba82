"""The embedded digits: provenance checksum, fixed split, value range."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from gradlab.datasets import load_data
from gradlab.datasets.digits import SHA256, digits_path
from gradlab.errors import UsageError


def test_file_matches_recorded_checksum_and_readme():
    digest = hashlib.sha256(digits_path().read_bytes()).hexdigest()
    assert digest == SHA256
    assert SHA256 in (digits_path().parent / "README.md").read_text()


def test_fixed_split_and_ranges(digits):
    assert len(digits.train) == 1438 and len(digits.test) == 359 and digits.input_shape == (1, 8, 8)
    assert digits.train.x.dtype == torch.float32 and 0 <= float(digits.train.x.min()) and float(digits.train.x.max()) == 1
    assert digits.train.y.bincount().tolist() == [151, 161, 143, 131, 147, 154, 150, 136, 127, 138]
    assert load_data("digits").train.x.equal(digits.train.x)


def test_tampered_file_is_refused(tmp_path, monkeypatch):
    shutil.copy(digits_path(), tmp_path / "digits.csv.gz")
    with open(tmp_path / "digits.csv.gz", "ab") as f:
        f.write(b"x")
    monkeypatch.setenv("GRADLAB_DATA", str(tmp_path))
    with pytest.raises(UsageError, match="expected 09f66e6d"):
        load_data("digits")
