"""Uploads in flight: each one spooled to temp files as it arrives, all of them within one byte budget.

An upload is not held in memory while it streams in (a slow or stalled client holds only disk), and the
bytes of every upload that has not yet been stored count against `UploadBudget`: one more chunk past it
is refused at once, so N concurrent uploads cannot take N x --max-upload-bytes of memory while they are
validated. Temp file names are ours, never the client's; a spool removes its files when it closes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hotlora.adapters.errors import InvalidArgument, ResourceExhausted

MAX_UPLOAD_FILES = 8


class UploadBudget:
    """Bytes of all uploads in flight together (--upload-buffer-bytes)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def reserve(self, n: int) -> None:
        with self._lock:
            if self._used + n > self.limit:
                raise ResourceExhausted(
                    f"uploads in flight already hold {self._used} of this server's {self.limit} bytes "
                    "(--upload-buffer-bytes); retry when they finish"
                )
            self._used += n

    def release(self, n: int) -> None:
        with self._lock:
            self._used -= n

    @contextlib.contextmanager
    def held(self, n: int) -> Iterator[None]:
        """`n` bytes already in memory (an upload that came in one message) reserved while in use."""
        self.reserve(n)
        try:
            yield
        finally:
            self.release(n)


class UploadSpool:
    """One upload's files. Use as a context manager: leaving it removes the files and frees the bytes."""

    def __init__(self, directory: Path, budget: UploadBudget, max_bytes: int):
        self._dir = Path(tempfile.mkdtemp(prefix="upload-", dir=directory))
        self._budget = budget
        self._max_bytes = max_bytes
        self._files: dict[str, tuple[Path, BinaryIO]] = {}
        self.total = 0
        self._reserved = 0

    def __enter__(self) -> UploadSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, filename: str, data: bytes) -> None:
        """Append `data` to the file `filename` (created on its first chunk)."""
        if filename not in self._files and len(self._files) >= MAX_UPLOAD_FILES:
            raise InvalidArgument(
                "too many files; a PEFT adapter directory has "
                "adapter_config.json and adapter_model.safetensors"
            )
        self.total += len(data)
        if self.total > self._max_bytes:
            raise ResourceExhausted(f"upload is over the {self._max_bytes}-byte limit (--max-upload-bytes)")
        self._budget.reserve(len(data))
        self._reserved += len(data)
        if filename not in self._files:
            path = self._dir / f"{len(self._files)}.part"
            self._files[filename] = (path, open(path, "wb"))  # noqa: SIM115 (closed in close())
        self._files[filename][1].write(data)

    def read(self) -> dict[str, bytes]:
        """Every file's bytes (what validation parses)."""
        out = {}
        for filename, (path, f) in self._files.items():
            f.flush()
            out[filename] = path.read_bytes()
        return out

    def close(self) -> None:
        for _, f in self._files.values():
            f.close()
        self._files.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._budget.release(self._reserved)
        self._reserved = 0


class UploadSpooler:
    """Makes spools under `directory` (emptied at start: spools of a process that died are garbage)."""

    def __init__(self, directory: Path, budget: UploadBudget, max_bytes: int):
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, exist_ok=True)
        self.budget = budget
        self.max_bytes = max_bytes

    def spool(self) -> UploadSpool:
        return UploadSpool(self.directory, self.budget, self.max_bytes)

    def in_flight(self) -> int:
        """Spools open now (their folders)."""
        return sum(1 for _ in self.directory.iterdir())
