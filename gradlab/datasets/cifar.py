"""CIFAR-10, binary version (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

Folder ``<root>/cifar10`` (``root`` is ``--data-root``, ``$GRADLAB_DATA_ROOT`` or ``~/.cache/gradlab``) holding
either the extracted ``cifar-10-batches-bin/`` (``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``)
or the archive ``cifar-10-binary.tar.gz``, which is read in place (members are never extracted to disk, so no
path in the archive is ever written).  The extracted folder wins when complete.

Each record is 3,073 bytes: one label byte (0..9), then 1,024 red, 1,024 green and 1,024 blue pixel bytes of a
32x32 image in row-major order.  x is (N, 3, 32, 32) float32 in [0, 1] (bytes / 255), y is (N,) int64; the split
is the official one (50,000 train from the five data batches, 10,000 test).

Checksums: the archive's size, SHA-256 and the MD5 published on the CIFAR page are checked on download and on
every read; extracted batch files are checked against their SHA-256.  ``verify=False`` or
``GRADLAB_SKIP_DATA_VERIFY=1`` skips the checksums (never the record-format checks) for files already present.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlab.datasets import DataBundle, Split
from gradlab.datasets.download import (RemoteFile, check_file, download_file, missing_files_error, resolve_root,
                                       verification_enabled)
from gradlab.errors import UsageError

log = logging.getLogger(__name__)

RECORD_BYTES = 1 + 3 * 32 * 32
MEMBER_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCHES = ("test_batch.bin",)

_ARCHIVE_SRC = ("MD5: the CIFAR page https://www.cs.toronto.edu/~kriz/cifar.html; SHA-256: TensorFlow Datasets' "
                "CIFAR-10 url checksums (identical in several independent downloaders)")
_BATCH_SRC = "SHA-256 of the extracted official batch files as listed by torchvision-ruby (ankane) CIFAR10"

# Module-level so tests can substitute checksums of tiny files.
CIFAR10_ARCHIVE = RemoteFile("cifar-10-binary.tar.gz", 170_052_171,
                             "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                             "c32a1d4ab5d03f1284b67883e8d87530", _ARCHIVE_SRC)
CIFAR10_BATCH_FILES: dict[str, RemoteFile] = {
    name: RemoteFile(name, 10_000 * RECORD_BYTES, sha, None, _BATCH_SRC)
    for name, sha in (
        ("data_batch_1.bin", "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5"),
        ("data_batch_2.bin", "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed"),
        ("data_batch_3.bin", "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67"),
        ("data_batch_4.bin", "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48"),
        ("data_batch_5.bin", "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add"),
        ("test_batch.bin", "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b"),
    )
}
CIFAR10_MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz",)
_NEEDED = [f"{CIFAR10_ARCHIVE.name} (or its extracted {MEMBER_DIR}/ folder)"]


def parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Split a binary batch into pixels (N, 3, 32, 32) uint8 and labels (N,) uint8, checking the record format."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise UsageError(f"{where} has {len(data)} bytes, not a positive multiple of the {RECORD_BYTES}-byte CIFAR-10 "
                         "record; the file is corrupt or not the binary version (cifar-10-binary.tar.gz)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0]
    if int(labels.max()) > 9:
        raise UsageError(f"{where} holds label {int(labels.max())}, expected 0..9; is this CIFAR-100?")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _read_folder(folder: Path, check: bool) -> dict[str, bytes]:
    out = {}
    for name in TRAIN_BATCHES + TEST_BATCHES:
        path = folder / name
        if check:
            check_file(path, CIFAR10_BATCH_FILES[name], hint=" (or put cifar-10-binary.tar.gz next to the folder)")
        out[name] = path.read_bytes()
    return out


def _read_archive(path: Path) -> dict[str, bytes]:
    wanted = {f"{MEMBER_DIR}/{name}": name for name in TRAIN_BATCHES + TEST_BATCHES}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile():
                    continue
                fh = tar.extractfile(member)
                if fh is not None:
                    out[name] = fh.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UsageError(f"{path} is not a readable tar.gz archive ({exc}); delete it and fetch it again") from exc
    lost = [m for m, n in wanted.items() if n not in out]
    if lost:
        raise UsageError(f"{path} lacks the members {', '.join(lost)}; is it the binary version of CIFAR-10?")
    return out


def _stack(blobs: dict[str, bytes], names: Sequence[str], where: str) -> Split:
    parts = [parse_batch(blobs[n], f"{where}:{n}") for n in names]
    pixels = np.concatenate([p for p, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    x = torch.from_numpy(pixels.astype(np.float32) / np.float32(255.0))
    return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))


def load_cifar10(root: Any = None, download: bool = False, verify: bool | None = None) -> DataBundle:
    """CIFAR-10 binary version from ``<root>/cifar10``: 50,000 train / 10,000 test 32x32 colour images."""
    folder = resolve_root(root) / "cifar10"
    extracted = folder / MEMBER_DIR
    archive = folder / CIFAR10_ARCHIVE.name
    check = verification_enabled(verify)
    if extracted.is_dir() and all((extracted / n).is_file() for n in TRAIN_BATCHES + TEST_BATCHES):
        source, blobs = extracted, _read_folder(extracted, check)
    else:
        if not archive.is_file():
            if not download:
                raise missing_files_error("cifar10", folder, _NEEDED, CIFAR10_MIRRORS)
            try:
                download_file(CIFAR10_ARCHIVE, CIFAR10_MIRRORS, folder)
            except UsageError as exc:
                raise missing_files_error("cifar10", folder, _NEEDED, CIFAR10_MIRRORS, str(exc)) from exc
        elif check:
            check_file(archive, CIFAR10_ARCHIVE, hint=" (pass --download)")
        source, blobs = archive, _read_archive(archive)
    return DataBundle(
        name="cifar10",
        train=_stack(blobs, TRAIN_BATCHES, str(source)),
        test=_stack(blobs, TEST_BATCHES, str(source)),
        n_classes=10,
        provenance={"source": "CIFAR-10 binary version, https://www.cs.toronto.edu/~kriz/cifar.html",
                    "license": "no explicit licence; cite Krizhevsky (2009)", "path": str(source),
                    "checksums_verified": check, "archive_sha256": CIFAR10_ARCHIVE.sha256,
                    "split": "official: data_batch_1..5 train, test_batch test"},
    )
