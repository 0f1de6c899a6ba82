"""Real dataset loaders on tiny generated files: IDX (MNIST, Fashion-MNIST), CIFAR-10 binary, downloads, user data.

Nothing here touches the network: ``gradlab.datasets.download.fetch_url`` is replaced by a fake server.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlab.datasets import cifar, download, idx, load_data
from gradlab.datasets.download import RemoteFile
from gradlab.errors import UsageError

REAL_FETCH = download.fetch_url
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
N = {"train": 5, "test": 3}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(download.SKIP_VERIFY_ENV, raising=False)
    monkeypatch.delenv(download.ROOT_ENV, raising=False)

    def offline(url, out, max_bytes, timeout=60.0):
        raise AssertionError(f"test tried to reach the network: {url}")

    monkeypatch.setattr(download, "fetch_url", offline)


def idx_bytes(arr: np.ndarray, dtype_code: int = 0x08) -> bytes:
    head = bytes([0, 0, dtype_code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def spec_of(name: str, data: bytes) -> RemoteFile:
    return RemoteFile(name, len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(), "test")


def tiny_idx(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in N.items():
        out[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        out[f"{split}_labels"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    return out


def idx_blobs(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, bytes]]:
    """role -> (official gz name, gz bytes)."""
    return {role: (idx.MNIST_FILES[role].name, gzip.compress(idx_bytes(arrays[role]), mtime=0)) for role in ROLES}


def write_idx(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> dict[str, RemoteFile]:
    """Write the four files; return role -> spec of what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = {}
    for role, (name, blob) in idx_blobs(arrays).items():
        if not gz:
            name, blob = name.removesuffix(".gz"), idx_bytes(arrays[role])
        (folder / name).write_bytes(blob)
        specs[role] = spec_of(name, blob)
    return specs


def assert_matches(bundle, arrays: dict[str, np.ndarray]) -> None:
    for split_name, split in (("train", bundle.train), ("test", bundle.test)):
        n = N[split_name]
        assert split.x.shape == (n, 1, 28, 28) and split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        expected = torch.from_numpy(arrays[f"{split_name}_images"].astype(np.float32) / 255).reshape(n, 1, 28, 28)
        torch.testing.assert_close(split.x, expected, rtol=0, atol=0)
        assert split.y.tolist() == arrays[f"{split_name}_labels"].tolist()
    assert 0.0 <= float(bundle.train.x.min()) and float(bundle.train.x.max()) <= 1.0
    assert bundle.n_classes == 10 and bundle.input_shape == (1, 28, 28)


# ---------------------------------------------------------------- IDX: MNIST and Fashion-MNIST


def test_mnist_from_gz_files_with_checksums(tmp_path, monkeypatch):
    arrays = tiny_idx()
    monkeypatch.setattr(idx, "MNIST_FILES", write_idx(tmp_path / "mnist", arrays))
    bundle = load_data("mnist", root=tmp_path)
    assert_matches(bundle, arrays)
    assert bundle.name == "mnist" and bundle.provenance["checksums_verified"] is True


def test_mnist_from_uncompressed_files_verified_against_raw_checksums(tmp_path, monkeypatch):
    arrays = tiny_idx(1)
    raw = write_idx(tmp_path / "mnist", arrays, gz=False)
    monkeypatch.setattr(idx, "MNIST_RAW_FILES", raw)
    assert_matches(load_data("mnist", root=tmp_path), arrays)
    bad = dict(raw, test_labels=RemoteFile(raw["test_labels"].name, raw["test_labels"].size, "0" * 64))
    monkeypatch.setattr(idx, "MNIST_RAW_FILES", bad)
    with pytest.raises(UsageError, match="t10k-labels-idx1-ubyte has SHA-256"):
        load_data("mnist", root=tmp_path)


def test_fashion_mnist_uncompressed_in_torchvision_folder_is_checked_by_header_only(tmp_path):
    arrays = tiny_idx(2)
    write_idx(tmp_path / "FashionMNIST" / "raw", arrays, gz=False)
    bundle = load_data("fashion-mnist", root=tmp_path)
    assert_matches(bundle, arrays)
    assert bundle.name == "fashion-mnist"


def test_fashion_mnist_gz_default_root_from_environment(tmp_path, monkeypatch):
    arrays = tiny_idx(3)
    monkeypatch.setattr(idx, "FASHION_MNIST_FILES", write_idx(tmp_path / "fashion-mnist", arrays))
    monkeypatch.setenv(download.ROOT_ENV, str(tmp_path))
    assert_matches(load_data("fashion-mnist"), arrays)


def test_checksum_mismatch_is_a_usage_error_and_can_be_skipped(tmp_path, monkeypatch):
    arrays = tiny_idx(4)
    specs = write_idx(tmp_path / "mnist", arrays)
    wrong = dict(specs, train_images=RemoteFile(specs["train_images"].name, specs["train_images"].size,
                                                hashlib.sha256(b"other").hexdigest(), None, "test table"))
    monkeypatch.setattr(idx, "MNIST_FILES", wrong)
    with pytest.raises(UsageError, match=r"train-images-idx3-ubyte.gz has SHA-256 .* expected .*test table"):
        load_data("mnist", root=tmp_path)
    monkeypatch.setenv(download.SKIP_VERIFY_ENV, "1")
    bundle = load_data("mnist", root=tmp_path)
    assert_matches(bundle, arrays)
    assert bundle.provenance["checksums_verified"] is False
    assert_matches(idx.load_mnist(root=tmp_path, verify=False), arrays)


def test_size_and_md5_are_checked_too(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    good = spec_of("f.bin", b"abc")
    download.check_file(path, good)
    with pytest.raises(UsageError, match="has 3 bytes, expected 4"):
        download.check_file(path, RemoteFile("f.bin", 4, good.sha256, good.md5))
    with pytest.raises(UsageError, match="has MD5"):
        download.check_file(path, RemoteFile("f.bin", 3, good.sha256, "0" * 32))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:2] + bytes([0x08, 0x01]) + b[4:], "magic number 2049 .*expected 2051"),
        (lambda b: b[:2] + bytes([0x0D]) + b[3:], "data type 0x0d, expected 0x08"),
        (lambda b: b[:-1], "truncated: .* expected"),
        (lambda b: b + b"\x00", "longer than its header says"),
        (lambda b: b[:10], "truncated inside its IDX header"),
        (lambda b: b"", "not an IDX file"),
    ],
    ids=["magic", "dtype", "truncated", "trailing", "short-header", "empty"],
)
def test_corrupt_idx_header_is_a_usage_error(tmp_path, monkeypatch, mutate, match):
    arrays = tiny_idx(5)
    write_idx(tmp_path / "mnist", arrays)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(mutate(idx_bytes(arrays["train_images"]))))
    monkeypatch.setenv(download.SKIP_VERIFY_ENV, "1")  # the parse runs even without checksums
    with pytest.raises(UsageError, match=match):
        load_data("mnist", root=tmp_path)


def test_idx_semantic_checks(tmp_path, monkeypatch):
    monkeypatch.setenv(download.SKIP_VERIFY_ENV, "1")
    arrays = tiny_idx(6)
    arrays["test_labels"] = np.array([1, 2, 12], dtype=np.uint8)
    write_idx(tmp_path / "a" / "mnist", arrays)
    with pytest.raises(UsageError, match="label 12, expected 0..9"):
        load_data("mnist", root=tmp_path / "a")
    arrays = tiny_idx(6)
    arrays["train_labels"] = arrays["train_labels"][:4]
    write_idx(tmp_path / "b" / "mnist", arrays)
    with pytest.raises(UsageError, match="5 images but .* 4 labels"):
        load_data("mnist", root=tmp_path / "b")
    arrays = tiny_idx(6)
    arrays["train_images"] = np.zeros((5, 27, 28), dtype=np.uint8)
    write_idx(tmp_path / "c" / "mnist", arrays)
    with pytest.raises(UsageError, match="expected 28x28"):
        load_data("mnist", root=tmp_path / "c")


def test_not_gzip_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv(download.SKIP_VERIFY_ENV, "1")
    write_idx(tmp_path / "mnist", tiny_idx(7))
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(UsageError, match="not a valid gzip file"):
        load_data("mnist", root=tmp_path)


def test_missing_files_offline_names_files_folder_and_source(tmp_path):
    with pytest.raises(UsageError) as info:
        load_data("mnist", root=tmp_path)
    msg = str(info.value)
    for spec in idx.MNIST_FILES.values():
        assert spec.name in msg
    assert str(tmp_path / "mnist") in msg and idx.MNIST_MIRRORS[0] in msg
    assert "--download" in msg and "--data-root" in msg


def test_one_missing_file_is_named_alone(tmp_path):
    write_idx(tmp_path / "mnist", tiny_idx(8))
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UsageError, match=r"needs the files train-labels-idx1-ubyte.gz in folder"):
        load_data("mnist", root=tmp_path)


# ---------------------------------------------------------------- downloads


class FakeServer:
    """Serves ``files`` under ``base``; records what it saw; ``down`` mirrors raise like an offline host."""

    def __init__(self, base: str, files: dict[str, bytes], down: tuple[str, ...] = ()) -> None:
        self.base, self.files, self.down = base, files, down
        self.calls: list[str] = []
        self.partial_names: list[str] = []

    def __call__(self, url: str, out, max_bytes: int, timeout: float = 60.0) -> None:
        self.calls.append(url)
        if any(url.startswith(d) for d in self.down):
            raise OSError("[Errno -3] Temporary failure in name resolution")
        name = url.rsplit("/", 1)[1]
        if not url.startswith(self.base) or name not in self.files:
            raise OSError(f"HTTP Error 404: {url}")
        # the bytes go to a hidden temporary file next to the final one, never to the final name
        tmp = Path(out.name)
        assert tmp.name.startswith(f".{name}.") and tmp.name.endswith(".part")
        assert not (tmp.parent / name).exists()
        self.partial_names.append(tmp.name)
        data = self.files[name]
        if len(data) > max_bytes:
            raise OSError("too large")
        out.write(data[: len(data) // 2])
        out.write(data[len(data) // 2:])


def test_download_tries_mirrors_verifies_and_renames_atomically(tmp_path, monkeypatch):
    arrays = tiny_idx(9)
    blobs = idx_blobs(arrays)
    monkeypatch.setattr(idx, "MNIST_FILES", {r: spec_of(n, b) for r, (n, b) in blobs.items()})
    monkeypatch.setattr(idx, "MNIST_MIRRORS", ("https://down.example/mnist", "https://up.example/mnist/"))
    server = FakeServer("https://up.example/mnist", {n: b for n, b in blobs.values()}, down=("https://down",))
    monkeypatch.setattr(download, "fetch_url", server)
    bundle = load_data("mnist", root=tmp_path, download=True)
    assert_matches(bundle, arrays)
    folder = tmp_path / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for n, _ in blobs.values())
    assert len(server.partial_names) == 4 and len(server.calls) == 8  # each file: the dead mirror, then the live one
    assert "https://up.example/mnist/train-images-idx3-ubyte.gz" in server.calls
    # a second load finds the files and does not download again
    server.calls.clear()
    assert_matches(load_data("mnist", root=tmp_path, download=True), arrays)
    assert server.calls == []


def test_bad_download_is_not_left_behind(tmp_path, monkeypatch):
    arrays = tiny_idx(10)
    blobs = idx_blobs(arrays)
    monkeypatch.setattr(idx, "MNIST_FILES", {r: spec_of(n, b) for r, (n, b) in blobs.items()})
    monkeypatch.setattr(idx, "MNIST_MIRRORS", ("https://a.example", "https://b.example"))
    corrupt = {n: bytes([b[0] ^ 0xFF]) + b[1:] for n, b in blobs.values()}  # same size, wrong bytes
    monkeypatch.setattr(download, "fetch_url", FakeServer("https://", corrupt))
    with pytest.raises(UsageError) as info:
        load_data("mnist", root=tmp_path, download=True)
    msg = str(info.value)
    assert "download failed" in msg and "SHA-256" in msg and "https://a.example" in msg and "https://b.example" in msg
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "mnist") in msg
    assert list((tmp_path / "mnist").iterdir()) == []  # neither a final file nor a .part file


def test_download_larger_than_recorded_is_refused(tmp_path, monkeypatch):
    spec = spec_of("x.bin", b"12345")
    monkeypatch.setattr(download, "fetch_url", FakeServer("https://h", {"x.bin": b"123456789"}))
    with pytest.raises(UsageError, match="could not download x.bin"):
        download.download_file(spec, ["https://h"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_offline_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch_url", FakeServer("https://", {}, down=("http",)))
    with pytest.raises(UsageError) as info:
        load_data("fashion-mnist", root=tmp_path, download=True)
    msg = str(info.value)
    assert "name resolution" in msg and str(tmp_path / "fashion-mnist") in msg
    assert all(s.name in msg for s in idx.FASHION_MNIST_FILES.values())
    assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))


def test_real_fetch_url_streams_and_caps_bytes(tmp_path):
    """The real fetch function, on a file:// URL (no network), honours max_bytes."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3000)
    buf = io.BytesIO()
    REAL_FETCH(src.as_uri(), buf, max_bytes=3000)
    assert buf.getvalue() == b"x" * 3000
    with pytest.raises(OSError, match="more than the expected 100 bytes"):
        REAL_FETCH(src.as_uri(), io.BytesIO(), max_bytes=100)


def test_recorded_official_checksums_are_well_formed():
    tables = [idx.MNIST_FILES, idx.MNIST_RAW_FILES, idx.FASHION_MNIST_FILES, cifar.CIFAR10_BATCH_FILES,
              {"archive": cifar.CIFAR10_ARCHIVE}]
    for table in tables:
        for spec in table.values():
            assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0 and spec.source
            assert spec.md5 is None or len(spec.md5) == 32
    # the uncompressed sizes follow from the IDX format: 16-byte header + N*28*28, 8-byte header + N
    sizes = {r: s.size for r, s in idx.MNIST_RAW_FILES.items()}
    assert sizes == {"train_images": 16 + 60000 * 784, "train_labels": 8 + 60000,
                     "test_images": 16 + 10000 * 784, "test_labels": 8 + 10000}
    assert all(s.size == 10000 * 3073 for s in cifar.CIFAR10_BATCH_FILES.values())


# ---------------------------------------------------------------- CIFAR-10 binary


def tiny_cifar(seed: int = 0, per_batch: int = 2) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in cifar.TRAIN_BATCHES + cifar.TEST_BATCHES:
        records = rng.integers(0, 256, size=(per_batch, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, size=per_batch)
        out[name] = records.tobytes()
    return out


def tarball(batches: dict[str, bytes], prefix: str = "cifar-10-batches-bin/") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = tarfile.TarInfo(prefix + "batches.meta.txt")
        readme.size = 3
        tar.addfile(readme, io.BytesIO(b"cat"))
    return buf.getvalue()


def assert_cifar(bundle, batches: dict[str, bytes], per_batch: int = 2) -> None:
    assert bundle.name == "cifar10" and bundle.n_classes == 10 and bundle.input_shape == (3, 32, 32)
    assert bundle.train.x.shape == (5 * per_batch, 3, 32, 32) and bundle.test.x.shape == (per_batch, 3, 32, 32)
    assert bundle.train.x.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    train = b"".join(batches[n] for n in cifar.TRAIN_BATCHES)
    for split, raw in ((bundle.train, train), (bundle.test, batches["test_batch.bin"])):
        for i in range(len(split)):
            rec = raw[i * 3073:(i + 1) * 3073]
            assert int(split.y[i]) == rec[0]
            # record layout: label, then 1024 red, 1024 green, 1024 blue bytes, each 32x32 row-major
            for c, row, col in ((0, 0, 0), (1, 5, 7), (2, 31, 31), (0, 31, 0)):
                byte = rec[1 + c * 1024 + row * 32 + col]
                assert float(split.x[i, c, row, col]) == np.float32(byte) / np.float32(255)


def test_cifar_from_tarball_read_in_place(tmp_path, monkeypatch):
    batches = tiny_cifar()
    blob = tarball(batches)
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").write_bytes(blob)
    monkeypatch.setattr(cifar, "CIFAR10_ARCHIVE", spec_of("cifar-10-binary.tar.gz", blob))
    assert_cifar(load_data("cifar10", root=tmp_path), batches)
    assert sorted(p.name for p in (tmp_path / "cifar10").iterdir()) == ["cifar-10-binary.tar.gz"]  # nothing extracted


def test_cifar_from_extracted_folder(tmp_path, monkeypatch):
    batches = tiny_cifar(1, per_batch=3)
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name, data in batches.items():
        (folder / name).write_bytes(data)
    monkeypatch.setattr(cifar, "CIFAR10_BATCH_FILES", {n: spec_of(n, d) for n, d in batches.items()})
    assert_cifar(load_data("cifar10", root=tmp_path), batches, per_batch=3)
    (folder / "data_batch_3.bin").write_bytes(batches["data_batch_4.bin"])
    with pytest.raises(UsageError, match="data_batch_3.bin has SHA-256"):
        load_data("cifar10", root=tmp_path)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:-1], "not a positive multiple of the 3073-byte"),
        (lambda b: bytes([12]) + b[1:], "label 12, expected 0..9"),
    ],
    ids=["truncated", "label"],
)
def test_corrupt_cifar_batch_is_a_usage_error(tmp_path, monkeypatch, mutate, match):
    batches = tiny_cifar(2)
    batches["test_batch.bin"] = mutate(batches["test_batch.bin"])
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").write_bytes(tarball(batches))
    with pytest.raises(UsageError, match=match):
        cifar.load_cifar10(root=tmp_path, verify=False)


def test_cifar_archive_problems(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    archive = folder / "cifar-10-binary.tar.gz"
    archive.write_bytes(tarball(tiny_cifar(3), prefix="cifar-10-batches-py/"))  # the python version's folder
    with pytest.raises(UsageError, match="lacks the members cifar-10-batches-bin/data_batch_1.bin"):
        cifar.load_cifar10(root=tmp_path, verify=False)
    archive.write_bytes(b"not a tarball")
    with pytest.raises(UsageError, match="not a readable tar.gz archive"):
        cifar.load_cifar10(root=tmp_path, verify=False)
    with pytest.raises(UsageError, match=r"cifar-10-binary.tar.gz has 13 bytes, expected 170052171"):
        load_data("cifar10", root=tmp_path)  # the official checksum table catches it first


def test_cifar_missing_offline_and_download(tmp_path, monkeypatch):
    with pytest.raises(UsageError) as info:
        load_data("cifar10", root=tmp_path)
    msg = str(info.value)
    assert "cifar-10-binary.tar.gz" in msg and str(tmp_path / "cifar10") in msg and "toronto.edu" in msg
    batches = tiny_cifar(4)
    blob = tarball(batches)
    monkeypatch.setattr(cifar, "CIFAR10_ARCHIVE", spec_of("cifar-10-binary.tar.gz", blob))
    server = FakeServer("https://www.cs.toronto.edu/~kriz", {"cifar-10-binary.tar.gz": blob})
    monkeypatch.setattr(download, "fetch_url", server)
    assert_cifar(load_data("cifar10", root=tmp_path, download=True), batches)
    assert server.calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").read_bytes() == blob


# ---------------------------------------------------------------- user data factories


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    (tmp_path / "gl_user_data.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import Dataset

        g = torch.Generator().manual_seed(0)
        X = torch.rand(6, 2, 4, 4, generator=g)
        Y = torch.tensor([0, 1, 2, 0, 1, 3])

        def tensors():
            return X, Y

        def split():
            return {"train": (X[:4], Y[:4]), "test": (X[4:].reshape(2, -1), Y[4:])}

        class Pairs(Dataset):
            def __len__(self):
                return 6
            def __getitem__(self, i):
                return X[i], int(Y[i])

        def dataset():
            return Pairs()

        def flat():
            return X.reshape(6, -1).double(), Y.float()

        def empty():
            return torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)

        def onehot():
            return X, torch.nn.functional.one_hot(Y)

        def negative():
            return X, Y - 1

        def fractional():
            return X, Y / 2

        def mismatched():
            return X, Y[:5]

        def strings():
            return ["a", "b"]

        class Broken(Dataset):
            def __len__(self):
                return 2
            def __getitem__(self, i):
                return "image"

        def broken():
            return Broken()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    return importlib.import_module("gl_user_data")


def test_user_factory_returning_tensors(user_data):
    bundle = load_data("gl_user_data:tensors")
    torch.testing.assert_close(bundle.train.x, user_data.X)
    assert bundle.train.y.tolist() == user_data.Y.tolist() and bundle.test is None
    assert bundle.n_classes == 4 and bundle.input_shape == (2, 4, 4)
    assert "gl_user_data:tensors" in bundle.provenance["source"]


def test_user_factory_returning_a_dataset_or_a_split_dict(user_data):
    ds = load_data("gl_user_data:dataset")
    torch.testing.assert_close(ds.train.x, user_data.X)
    assert ds.train.y.dtype == torch.int64 and ds.train.y.tolist() == user_data.Y.tolist()
    sp = load_data("gl_user_data:split")
    # the task contract: user inputs keep their shape and dtype (the test split was returned flat: it stays flat)
    assert len(sp.train) == 4 and sp.test.x.shape == (2, 32) and sp.n_classes == 4
    flat = load_data("gl_user_data:flat")
    assert flat.train.x.dtype == torch.float64 and flat.input_shape == (32,)
    assert flat.train.y.dtype == torch.float32 and flat.n_classes == 0  # float targets: not class indices


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("empty", "no examples"),
        ("mismatched", "must share their first dimension"),
        ("strings", "returned list"),
        ("broken", "holds no tensors"),
        ("missing", "no attribute"),
    ],
)
def test_bad_user_data_is_a_usage_error(user_data, factory, match):
    # regression: an empty factory result used to crash with a RuntimeError from .max() instead of a UsageError
    with pytest.raises(UsageError, match=match):
        load_data(f"gl_user_data:{factory}")


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("onehot", "logits \\(B, C, …\\) matching targets"),
        ("negative", "labels range over -1"),
        ("fractional", "needs integer class-index targets"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused_by_the_cross_entropy_task(user_data, factory, match):
    from torch import nn

    from gradlab.task import check_task, cross_entropy

    bundle = load_data(f"gl_user_data:{factory}")  # valid data for some task (soft labels, regression targets)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 4))
    with pytest.raises(UsageError, match=match):
        check_task(model, cross_entropy, bundle.train)


def test_unknown_dataset_name():
    with pytest.raises(UsageError, match="unknown dataset 'imagenet'.*cifar10"):
        load_data("imagenet")
