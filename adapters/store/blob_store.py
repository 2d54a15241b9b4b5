"""Content-addressed storage of adapter files (docs/design.md §7: a local directory, or S3-compatible).

Blobs are named by the sha256 of their bytes, so writes are idempotent, paths never come from client
strings, and every read can be verified.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"


class BlobIntegrityError(RuntimeError):
    """A stored blob is missing or its bytes no longer hash to its name: the store is damaged (not a
    caller's mistake)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(ABC):
    """Immutable blobs keyed by the sha256 of their content."""

    @abstractmethod
    def put(self, data: bytes) -> str:
        """Store `data` durably (idempotent) and return its sha256 hex digest."""

    @abstractmethod
    def get(self, sha256: str) -> bytes:
        """The blob's bytes, verified against `sha256`; BlobIntegrityError if missing or damaged."""

    @abstractmethod
    def iter_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        """The blob in chunks of at most `chunk_bytes` (at least one, empty for an empty blob), verified
        against `sha256` before the first is yielded; never the whole blob in memory."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove the blob; no error if it is already gone."""

    @abstractmethod
    def list(self) -> Iterator[str]:
        """Every stored digest."""

    @abstractmethod
    def check(self) -> None:
        """Raises unless a blob could be written now (the health probe)."""

    def close(self) -> None:  # noqa: B027 (a directory holds nothing to release)
        """Release what the store holds (threads, connections)."""


class LocalBlobStore(BlobStore):
    """`<root>/ab/cdef...`: written to a temp file in the same folder, fsynced, renamed, folder fsynced."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_partial_writes()

    def _path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        path = self._path(digest)
        try:  # one stat: a concurrent delete of the same blob may remove it between two looks
            have = path.stat()
        except FileNotFoundError:
            have = None
        if have is not None and stat.S_ISREG(have.st_mode) and have.st_size == len(data):
            return digest
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            data = self._path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobIntegrityError(f"blob {sha256} is missing from {self.root}") from None
        if sha256_hex(data) != sha256:
            raise BlobIntegrityError(f"blob {sha256} in {self.root} is damaged: its bytes hash differently")
        return data

    def iter_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        path = self._path(sha256)
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below, also when the consumer stops early)
        except FileNotFoundError:
            raise BlobIntegrityError(f"blob {sha256} is missing from {self.root}") from None
        with f:
            digest = hashlib.sha256()
            for data in iter(lambda: f.read(chunk_bytes), b""):
                digest.update(data)
            if digest.hexdigest() != sha256:
                raise BlobIntegrityError(
                    f"blob {sha256} in {self.root} is damaged: its bytes hash differently"
                )
            f.seek(0)
            data = f.read(chunk_bytes)
            yield data
            while data := f.read(chunk_bytes):
                yield data

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        path = self._path(sha256)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def list(self) -> Iterator[str]:
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    digest = sub.name + f.name
                    if _SHA256.fullmatch(digest):
                        yield digest

    def check(self) -> None:
        with tempfile.TemporaryFile(dir=self.root, prefix=_TMP_PREFIX):
            pass

    def _remove_partial_writes(self) -> None:
        # Left by a crash between mkstemp and os.replace; at start-up nothing of ours is still writing.
        for tmp in self.root.glob(f"*/{_TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
