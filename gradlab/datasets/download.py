"""Fetch raw dataset files from a list of mirrors, verified by checksum, written atomically.

The data root is ``root`` when given (the CLI's ``--data-root``), else ``$GRADLAB_DATA_ROOT``, else
``~/.cache/gradlab``; each dataset keeps its files in a sub-folder (``<root>/mnist`` ...).

A download goes to a hidden temporary file in the destination folder, is checked against the recorded size,
SHA-256 and (where upstream publishes one) MD5, and only then renamed into place (``os.replace``), so a partial
or corrupt download is never left under the final name.  Mirrors are tried in order.  Without network access
(or without ``download``) the error says which files to put in which folder and where to get them.

Files already in the folder are verified too, unless verification is switched off with the loaders'
``verify=False`` or the environment variable ``GRADLAB_SKIP_DATA_VERIFY=1`` (useful for re-packed copies
whose bytes differ from the official archives).  Downloads are always verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gradlab.errors import UsageError

log = logging.getLogger(__name__)

ROOT_ENV = "GRADLAB_DATA_ROOT"
SKIP_VERIFY_ENV = "GRADLAB_SKIP_DATA_VERIFY"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name, size in bytes, SHA-256, optional MD5, and where those numbers come from."""

    name: str
    size: int
    sha256: str
    md5: str | None = None
    source: str = ""


def default_root() -> Path:
    """``$GRADLAB_DATA_ROOT`` if set, else ``~/.cache/gradlab``."""
    env = os.environ.get(ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradlab"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """The data root: ``root`` if given, else :func:`default_root`."""
    return Path(root).expanduser() if root is not None else default_root()


def verification_enabled(verify: bool | None) -> bool:
    """``verify`` if given; otherwise on unless ``$GRADLAB_SKIP_DATA_VERIFY`` is ``1``/``true``/``yes``."""
    if verify is not None:
        return bool(verify)
    return os.environ.get(SKIP_VERIFY_ENV, "").strip().lower() not in {"1", "true", "yes"}


def file_digests(path: Path) -> tuple[int, str, str]:
    """(size, SHA-256 hex, MD5 hex) of a file, read in 1 MiB chunks."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest(), md5.hexdigest()


def check_file(path: Path, spec: RemoteFile, hint: str = "") -> None:
    """Raise :class:`UsageError` unless ``path`` has the size, SHA-256 and MD5 recorded in ``spec``."""
    size, sha, md5 = file_digests(path)
    problem = None
    if size != spec.size:
        problem = f"has {size} bytes, expected {spec.size}"
    elif sha != spec.sha256:
        problem = f"has SHA-256 {sha}, expected {spec.sha256}"
    elif spec.md5 is not None and md5 != spec.md5:
        problem = f"has MD5 {md5}, expected {spec.md5}"
    if problem:
        raise UsageError(
            f"{path} {problem} (checksums from {spec.source or 'gradlab'}); the file is corrupt or not the official "
            f"one: delete it and fetch it again{hint}, or set {SKIP_VERIFY_ENV}=1 to use it unverified"
        )


def fetch_url(url: str, out: BinaryIO, max_bytes: int, timeout: float = 60.0) -> None:
    """Stream ``url`` into ``out``; stop with ``OSError`` past ``max_bytes``.  The only function that touches
    the network (tests replace it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "gradlab"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (https/http mirrors only)
        written = 0
        while chunk := response.read(_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise OSError(f"{url} sent more than the expected {max_bytes} bytes")
            out.write(chunk)


def download_file(spec: RemoteFile, mirrors: Sequence[str], folder: Path) -> Path:
    """Fetch ``spec.name`` from the first mirror that serves the verified file; return its final path.

    Each attempt writes ``folder/.<name>.<random>.part``, verifies it with :func:`check_file`, and renames it to
    ``folder/<name>``; a failed attempt removes its temporary file.  Raises :class:`UsageError` listing every
    mirror's error when all fail.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / spec.name
    errors: list[str] = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + spec.name
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{spec.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s", url)
            with open(tmp, "wb") as out:
                fetch_url(url, out, max_bytes=spec.size)
                out.flush()
                os.fsync(out.fileno())
            check_file(tmp, spec)
            os.replace(tmp, final)
            return final
        except (OSError, UsageError) as exc:
            errors.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise UsageError(f"could not download {spec.name} into {folder}: " + "; ".join(errors))


def missing_files_error(dataset: str, folder: Path, names: Sequence[str], urls: Sequence[str],
                        download_error: str | None = None) -> UsageError:
    """The error for files that are neither in ``folder`` nor downloaded: which files, where, and from where.

    ``download_error`` is the reason a download attempt failed (``None`` when none was attempted).
    """
    how = (f"the download failed ({download_error}); check the network and retry" if download_error is not None
           else "pass --download to fetch them with checksum verification")
    sources = " or ".join(u.rstrip("/") + "/" for u in urls)
    return UsageError(
        f"dataset {dataset!r} needs the files {', '.join(names)} in folder {folder}: put them there (from "
        f"{sources}), or {how}, or pass --data-root (or set {ROOT_ENV}) to a folder whose "
        f"'{folder.name}' sub-folder holds them"
    )
