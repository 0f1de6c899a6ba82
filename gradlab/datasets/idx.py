"""MNIST and Fashion-MNIST from the four standard IDX files (gzipped as distributed, or uncompressed).

Folder: ``<root>/mnist`` (or torchvision's ``<root>/MNIST/raw``) and ``<root>/fashion-mnist`` (or
``<root>/FashionMNIST/raw``), where ``root`` is ``--data-root``, ``$GRADLAB_DATA_ROOT`` or ``~/.cache/gradlab``.
Files: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``; each may also be present uncompressed (same name without ``.gz``).

Checksums (decided here): a ``.gz`` file is checked against the official size, SHA-256 and MD5 on download and
every time it is read from the folder; an uncompressed MNIST file against the SHA-256 of the decompressed
official file; Fashion-MNIST publishes no checksum of its uncompressed files, so those are checked only by the
strict IDX parse below (magic number, dtype, dimensions, exact length).  ``verify=False`` or
``GRADLAB_SKIP_DATA_VERIFY=1`` skips the checksum (never the parse) for files already in the folder.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic ``0x00 0x00 <dtype> <ndim>``
(dtype ``0x08`` = unsigned byte; images ``0x00000803`` = 2051, labels ``0x00000801`` = 2049), then ``ndim``
big-endian uint32 sizes, then the data in C order.  Pixels are scaled by 1/255 to [0, 1]; x is (N, 1, 28, 28)
float32, y is (N,) int64 in 0..9.  The split is the official one: 60,000 train, 10,000 test.
"""

from __future__ import annotations

import gzip
import logging
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

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
UBYTE = 0x08

_MNIST_SRC = ("SHA-256: TensorFlow Datasets' MNIST url checksums (identical in torchvision-ruby and other "
              "downloaders); MD5: torchvision.datasets.MNIST.resources")
_MNIST_RAW_SRC = "SHA-256 of the decompressed official MNIST files (identical in several independent projects)"
_FASHION_SRC = ("SHA-256: torchvision prototype FashionMNIST._CHECKSUMS; MD5: zalandoresearch/fashion-mnist README "
                "and torchvision.datasets.FashionMNIST.resources")

# Official files, keyed by role.  Module-level so tests can substitute checksums of tiny files.
MNIST_FILES: dict[str, RemoteFile] = {
    "train_images": RemoteFile("train-images-idx3-ubyte.gz", 9_912_422,
                               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                               "f68b3c2dcbeaaa9fbdd348bbdeb94873", _MNIST_SRC),
    "train_labels": RemoteFile("train-labels-idx1-ubyte.gz", 28_881,
                               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                               "d53e105ee54ea40749a09fcbcd1e9432", _MNIST_SRC),
    "test_images": RemoteFile("t10k-images-idx3-ubyte.gz", 1_648_877,
                              "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                              "9fb629c4189551a2d022fa330f9573f3", _MNIST_SRC),
    "test_labels": RemoteFile("t10k-labels-idx1-ubyte.gz", 4_542,
                              "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                              "ec29112dd5afa0611ce80d1b7f02629c", _MNIST_SRC),
}
MNIST_RAW_FILES: dict[str, RemoteFile] = {
    "train_images": RemoteFile("train-images-idx3-ubyte", 47_040_016,
                               "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                               None, _MNIST_RAW_SRC),
    "train_labels": RemoteFile("train-labels-idx1-ubyte", 60_008,
                               "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                               None, _MNIST_RAW_SRC),
    "test_images": RemoteFile("t10k-images-idx3-ubyte", 7_840_016,
                              "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                              None, _MNIST_RAW_SRC),
    "test_labels": RemoteFile("t10k-labels-idx1-ubyte", 10_008,
                              "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                              None, _MNIST_RAW_SRC),
}
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist",
    "https://storage.googleapis.com/cvdf-datasets/mnist",
    "http://yann.lecun.com/exdb/mnist",
)

FASHION_MNIST_FILES: dict[str, RemoteFile] = {
    "train_images": RemoteFile("train-images-idx3-ubyte.gz", 26_421_880,
                               "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                               "8d4fb7e6c68d591d4c3dfef9ec88bf0d", _FASHION_SRC),
    "train_labels": RemoteFile("train-labels-idx1-ubyte.gz", 29_515,
                               "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                               "25c81989df183df01b3e8a0aad5dffbe", _FASHION_SRC),
    "test_images": RemoteFile("t10k-images-idx3-ubyte.gz", 4_422_102,
                              "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                              "bef4ecab320f06d8554ea6380940ec79", _FASHION_SRC),
    "test_labels": RemoteFile("t10k-labels-idx1-ubyte.gz", 5_148,
                              "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                              "bb300cfdad3c16e7a12a480ee83cd310", _FASHION_SRC),
}
FASHION_MNIST_RAW_FILES: dict[str, RemoteFile] = {}  # upstream publishes no checksum of the uncompressed files
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "https://fashion-mnist.s3.eu-central-1.amazonaws.com",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
)


def parse_idx(data: bytes, path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file strictly: magic ``magic`` (2051 images, 2049 labels), unsigned bytes, exact length."""
    want_ndim = magic & 0xFF
    if len(data) < 4:
        raise UsageError(f"{path} is not an IDX file: only {len(data)} bytes")
    if data[0] != 0 or data[1] != 0 or data[3] != want_ndim:
        found = int.from_bytes(data[:4], "big")
        raise UsageError(f"{path} has IDX magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x}); "
                         "the file is corrupt or not an MNIST-style IDX file of this kind")
    if data[2] != UBYTE:
        raise UsageError(f"{path} has IDX data type 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    header = 4 + 4 * want_ndim
    if len(data) < header:
        raise UsageError(f"{path} is truncated inside its IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(want_ndim))
    if dims[0] == 0:
        raise UsageError(f"{path} holds no examples (IDX dimensions {dims})")
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise UsageError(f"{path} is {what}: {len(data)} bytes, expected {expected} for IDX dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise UsageError(f"{path} is not a valid gzip file ({exc}); delete it and fetch it again") from exc


def _locate(gz: RemoteFile, folders: Sequence[Path]) -> Path | None:
    """First of ``<folder>/<name>.gz`` or ``<folder>/<name>`` that exists, over the candidate folders."""
    for folder in folders:
        for name in (gz.name, gz.name.removesuffix(".gz")):
            if (folder / name).is_file():
                return folder / name
    return None


def _split(images: np.ndarray, labels: np.ndarray, paths: tuple[Path, Path], n_classes: int) -> Split:
    if images.shape[1:] != (28, 28):
        raise UsageError(f"{paths[0]} holds images of size {images.shape[1:]}, expected 28x28")
    if labels.shape[0] != images.shape[0]:
        raise UsageError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= n_classes:
        raise UsageError(f"{paths[1]} holds label {int(labels.max())}, expected 0..{n_classes - 1}")
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))


def load_idx_dataset(name: str, alt_folder: str, files: dict[str, RemoteFile], raw_files: dict[str, RemoteFile],
                     mirrors: Sequence[str], root: Any = None, download: bool = False,
                     verify: bool | None = None, provenance: dict[str, Any] | None = None) -> DataBundle:
    """Find (or download) the four IDX files of ``name`` under ``root``, verify and parse them."""
    base = resolve_root(root)
    folder = base / name
    folders = (folder, base / alt_folder)
    check = verification_enabled(verify)
    found = {role: _locate(files[role], folders) for role in ROLES}
    missing = [role for role in ROLES if found[role] is None]
    fresh: set[str] = set()
    if missing and download:
        try:
            for role in missing:
                found[role] = download_file(files[role], mirrors, folder)
                fresh.add(role)
        except UsageError as exc:
            raise missing_files_error(name, folder, [files[r].name for r in missing], mirrors, str(exc)) from exc
    elif missing:
        raise missing_files_error(name, folder, [files[r].name for r in missing], mirrors)
    paths: dict[str, Path] = {role: p for role, p in found.items() if p is not None}
    for role, path in paths.items():
        if role in fresh or not check:
            continue
        spec = files[role] if path.suffix == ".gz" else raw_files.get(role)
        if spec is None:
            log.info("%s: no published checksum for the uncompressed file; checked by its IDX header only", path)
            continue
        check_file(path, spec, hint=" (pass --download)")
    arrays = {role: parse_idx(_read_bytes(p), p, IMAGE_MAGIC if role.endswith("images") else LABEL_MAGIC)
              for role, p in paths.items()}
    train = _split(arrays["train_images"], arrays["train_labels"], (paths["train_images"], paths["train_labels"]), 10)
    test = _split(arrays["test_images"], arrays["test_labels"], (paths["test_images"], paths["test_labels"]), 10)
    prov = dict(provenance or {})
    prov.update({"folder": str(paths["train_images"].parent), "checksums_verified": check,
                 "files": {files[r].name: files[r].sha256 for r in ROLES}, "split": "official train/test files"})
    return DataBundle(name=name, train=train, test=test, n_classes=10, provenance=prov)


def load_mnist(root: Any = None, download: bool = False, verify: bool | None = None) -> DataBundle:
    """MNIST (LeCun, Cortes & Burges): 60,000 train and 10,000 test 28x28 digits, x in [0, 1]."""
    return load_idx_dataset(
        "mnist", "MNIST/raw", MNIST_FILES, MNIST_RAW_FILES, MNIST_MIRRORS, root, download, verify,
        {"source": "MNIST database, http://yann.lecun.com/exdb/mnist/", "license": "CC BY-SA 3.0"},
    )


def load_fashion_mnist(root: Any = None, download: bool = False, verify: bool | None = None) -> DataBundle:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747): 60,000 + 10,000 28x28 images, x in [0, 1]."""
    return load_idx_dataset(
        "fashion-mnist", "FashionMNIST/raw", FASHION_MNIST_FILES, FASHION_MNIST_RAW_FILES, FASHION_MNIST_MIRRORS,
        root, download, verify,
        {"source": "Fashion-MNIST, https://github.com/zalandoresearch/fashion-mnist", "license": "MIT"},
    )
