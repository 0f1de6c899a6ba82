"""The UCI handwritten digits (8x8, 1,797 images, CC BY 4.0), shipped in ``data/digits.csv.gz``.

Provenance: ``data/README.md``.  The split is fixed: example i goes to the test set when ``i % 5 == 4``
(359 test images, 1,438 train), so the split never depends on a random generator.  Pixels (0..16) are scaled
to [0, 1]; inputs have shape (N, 1, 8, 8).
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

SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
N_EXAMPLES = 1797


def digits_path() -> Path:
    """``$GRADLAB_DATA/digits.csv.gz`` if set, else the repository's ``data/digits.csv.gz``."""
    env = os.environ.get("GRADLAB_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "data"
    return base / "digits.csv.gz"


def load_digits(root: Any = None, download: bool = False) -> DataBundle:
    """Load the embedded digits with the fixed split, verifying the file's SHA-256."""
    path = digits_path()
    if not path.exists():
        raise UsageError(f"embedded digits file {path} is missing; reinstall gradlab from its repository or set "
                         "GRADLAB_DATA to the folder holding digits.csv.gz")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise UsageError(f"{path} has SHA-256 {digest}, expected {SHA256}; restore it from the repository")
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    test = torch.arange(N_EXAMPLES) % 5 == 4
    return DataBundle(
        name="digits",
        train=Split(x[~test].contiguous(), y[~test].contiguous()),
        test=Split(x[test].contiguous(), y[test].contiguous()),
        n_classes=10,
        provenance={"source": "UCI ML hand-written digits via scikit-learn's digits.csv.gz", "license": "CC BY 4.0",
                    "sha256": SHA256, "split": "test = index % 5 == 4"},
    )
