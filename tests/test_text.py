"""The embedded character-level corpus: checksum, shapes and dtypes, next-character targets, a disjoint fixed split,
decoding back to the text."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from gradlab.datasets import load_data
from gradlab.datasets.text import SHA256, decode, load_shakespeare_char, read_text, shakespeare_path
from gradlab.errors import UsageError


@pytest.fixture(scope="module")
def text() -> str:
    return read_text()


@pytest.fixture(scope="module")
def corpus():
    return load_data("shakespeare-char")


def test_file_matches_recorded_checksum_and_readme():
    assert hashlib.sha256(shakespeare_path().read_bytes()).hexdigest() == SHA256
    assert SHA256 in (shakespeare_path().parent / "README.md").read_text()


def test_tampered_file_is_a_one_line_usage_error(tmp_path, monkeypatch):
    shutil.copy(shakespeare_path(), tmp_path / "shakespeare.txt.gz")
    with open(tmp_path / "shakespeare.txt.gz", "ab") as f:
        f.write(b"x")
    monkeypatch.setenv("GRADLAB_DATA", str(tmp_path))
    with pytest.raises(UsageError, match=f"expected {SHA256}; restore it") as info:
        load_data("shakespeare-char")
    assert "\n" not in str(info.value)


def test_missing_file_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLAB_DATA", str(tmp_path))
    with pytest.raises(UsageError, match="set GRADLAB_DATA"):
        load_data("shakespeare-char")


def test_shapes_dtypes_and_vocabulary(corpus, text):
    vocab = corpus.provenance["vocab"]
    assert vocab == "".join(sorted(set(text))) and corpus.n_classes == len(vocab) == 76
    assert len(text) == 613_823 and corpus.input_shape == (64,)
    for split, n in ((corpus.train, 8631), (corpus.test, 959)):
        assert split.x.shape == split.y.shape == (n, 64)
        assert split.x.dtype == split.y.dtype == torch.int64
        assert 0 <= int(split.x.min()) and int(split.x.max()) < corpus.n_classes


def test_targets_are_the_inputs_shifted_by_one_character(corpus):
    for split in (corpus.train, corpus.test):
        assert torch.equal(split.y[:, :-1], split.x[:, 1:])
        assert torch.equal(split.y[:-1, -1], split.x[1:, 0])  # windows are consecutive and non-overlapping


@pytest.mark.parametrize("block_size", [64, 7])
def test_windows_decode_to_the_text_and_the_split_is_the_last_tenth(text, block_size):
    data = load_shakespeare_char(block_size=block_size)
    vocab, cut = data.provenance["vocab"], len(text) - len(text) // 10
    train, test = decode(data.train.x, vocab), decode(data.test.x, vocab)
    assert train == text[: len(train)] and len(train) > cut - block_size - 1
    assert test == text[cut: cut + len(test)] and len(test) > len(text) - cut - block_size - 1
    assert decode(data.train.y, vocab) == text[1: len(train) + 1]
    assert decode(data.test.y, vocab) == text[cut + 1: cut + len(test) + 1]
    assert len(train) + 1 <= cut  # the last train target still lies before the test text: the splits are disjoint
    assert data.train.x.shape[1] == block_size


@pytest.mark.parametrize("block_size", [0, 2.5, True, 61_382])
def test_bad_block_size_is_a_usage_error(block_size):
    with pytest.raises(UsageError, match="block_size"):
        load_shakespeare_char(block_size=block_size)
