"""Downloading dataset files into a local cache: checksums, atomic writes, a file lock.

Guarantees of :func:`maybe_download`:

- **Atomic**: bytes stream into a temporary ``*.partial`` file beside the target, which is
  moved into place with ``os.replace`` only after the download is complete (length matches
  ``Content-Length``) and verified. Any failure, including Ctrl-C, deletes the temporary file;
  the target name never holds a partial file.
- **Concurrency-safe**: an exclusive ``fcntl`` lock on ``<file>.lock`` serializes processes
  that want the same file; the second one finds the file present when it gets the lock.
- **Checksums**: when a sha256 is known (argument or :data:`KNOWN_SHA256`), the download must
  match it or is discarded with an error. When none is known, the digest of the first download
  is written to ``<file>.sha256`` and later downloads of that name must match it. (FedJAX
  publishes no checksums for its dataset files.) Cached files are not re-hashed on every load,
  which would cost seconds for the 1.5 GB EMNIST file; :func:`verify_file` does it on demand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import pathlib
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import BinaryIO

from fedjax_exp.core.atomic_file import AtomicFile

__all__ = [
    "KNOWN_SHA256",
    "ChecksumError",
    "DownloadError",
    "default_cache_dir",
    "file_lock",
    "maybe_download",
    "sha256_of_file",
    "verify_file",
]

# sha256 of published dataset files, by file name. FedJAX's EMNIST SQLite files
# (https://storage.googleapis.com/gresearch/fedjax/emnist/...) come without published
# checksums and could not be fetched from here to compute them, so none are recorded; their
# digests are recorded in a ``.sha256`` file beside the download instead (see module doc).
KNOWN_SHA256: dict[str, str] = {}

_BLOCK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be downloaded (network unreachable, HTTP error, short read)."""


class ChecksumError(DownloadError):
    """A downloaded or cached file does not match its expected sha256."""


def default_cache_dir() -> pathlib.Path:
    """FedJAX's default cache directory: ``~/.cache/fedjax`` (``/tmp/.cache/fedjax`` on Colab)."""
    base = "/tmp" if "google.colab" in sys.modules else os.path.expanduser("~")
    return pathlib.Path(base) / ".cache" / "fedjax"


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike[str], sha256: str) -> None:
    """Raises :class:`ChecksumError` unless ``path``'s sha256 is ``sha256``."""
    actual = sha256_of_file(path)
    if actual != sha256.lower():
        raise ChecksumError(
            f"sha256 mismatch for {str(path)!r}: expected {sha256}, got {actual}; delete the "
            "file to download it again"
        )


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), held for the block."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _expected_sha256(target: pathlib.Path, sha256: str | None) -> str | None:
    if sha256 is not None:
        return sha256.lower()
    if target.name in KNOWN_SHA256:
        return KNOWN_SHA256[target.name]
    recorded = target.with_name(target.name + ".sha256")
    if recorded.is_file():
        return recorded.read_text().split()[0].lower()
    return None


def maybe_download(
    url: str,
    cache_dir: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    filename: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> pathlib.Path:
    """Returns the cached copy of ``url``, downloading it first if absent.

    Args:
      url: http(s):// or file:// URL.
      cache_dir: where files live (default :func:`default_cache_dir`).
      sha256: expected hex digest; overrides :data:`KNOWN_SHA256` and any recorded digest.
      filename: name in the cache (default: the URL's last path component).
      timeout: socket timeout in seconds.
      progress: print progress to stderr.

    Raises:
      DownloadError: the URL cannot be reached or the transfer is incomplete.
      ChecksumError: the downloaded bytes do not match the expected sha256.
    """
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = filename or os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"cannot derive a file name from URL {url!r}; pass filename=")
    target = cache / name
    if target.is_file():
        return target
    with file_lock(cache / (name + ".lock")):
        if target.is_file():  # Another process finished it while we waited for the lock.
            return target
        expected = _expected_sha256(target, sha256)
        digest = _download_atomically(url, target, expected, timeout, progress)
        if expected is None:
            record = target.with_name(name + ".sha256")
            with AtomicFile(record) as atomic:
                atomic.tmp.write_text(f"{digest}  {name}\n")
    return target


def _download_atomically(
    url: str, target: pathlib.Path, expected: str | None, timeout: float, progress: bool
) -> str:
    """Streams ``url`` into ``target`` via a temporary file; returns the sha256 of the bytes."""
    with AtomicFile(target) as atomic, open(atomic.tmp, "wb") as out:
        digest = _stream(url, out, target, timeout, progress)
        out.flush()
        os.fsync(out.fileno())  # On disk before the rename makes it visible.
        if expected is not None and digest != expected:
            raise ChecksumError(
                f"sha256 mismatch for {url!r}: expected {expected}, got {digest}; the "
                "download was discarded"
            )
    return digest


def _stream(url: str, out: BinaryIO, target: pathlib.Path, timeout: float, progress: bool) -> str:
    """Copies the body of ``url`` to ``out``, checking its length; returns its sha256."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(f"cannot download {url!r}: {exc}") from exc
    digest = hashlib.sha256()
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        received = 0
        if progress:
            print(f"Downloading {url} -> {target}", file=sys.stderr, flush=True)
        try:
            for block in iter(lambda: response.read(_BLOCK), b""):
                out.write(block)
                digest.update(block)
                received += len(block)
                if progress and length:
                    pct = 100 * received / length
                    print(f"\r{pct:5.1f}%", end="", file=sys.stderr, flush=True)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(
                f"download of {url!r} interrupted after {received} bytes: {exc}"
            ) from exc
        if progress:
            print(file=sys.stderr, flush=True)
    if length is not None and received != length:
        raise DownloadError(f"incomplete download of {url!r}: got {received} of {length} bytes")
    return digest.hexdigest()
