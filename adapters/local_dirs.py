"""PEFT adapter directories that lie on the server (vLLM's `POST /v1/load_lora_adapter`), read only inside
the operator's --allowed-local-adapter-dirs.

A client names a path. The directory and every file read from it are resolved (`..` and symlinks) and must
lie inside an allowed directory: a file in an allowed directory that links elsewhere
(`adapter_config.json -> /etc/passwd`) is refused by name before anything opens it, while links that stay
inside (a Hugging Face cache's snapshot -> blob links) are followed. Each file is then opened at its resolved
path without following links (O_NOFOLLOW) and must be the very file that was checked (same device and inode),
so a file or a directory on the way swapped for a link between the check and the read is refused too."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hotlora.adapters.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from hotlora.adapters.peft.files import refuse_model_files

MAX_FILES = 8
ALLOWED_FLAG = "--allowed-local-adapter-dirs"


@dataclass(frozen=True)
class LocalFile:
    name: str  # the file's name in the adapter directory (what the upload calls it)
    path: Path  # resolved: no link in it, inside an allowed directory
    size: int
    identity: tuple[int, int]  # (st_dev, st_ino) when checked


class LocalAdapterDirs:
    def __init__(self, allowed: Sequence[str], max_bytes: int):
        self.allowed = tuple(Path(d).resolve() for d in allowed)
        self.max_bytes = max_bytes

    def _inside(self, path: Path) -> bool:
        return any(path == d or d in path.parents for d in self.allowed)

    def listing(self, lora_path: str) -> list[LocalFile]:
        """The files of the PEFT directory `lora_path`, each checked; nothing is opened yet."""
        if not self.allowed:
            raise PermissionDenied(
                f"loading adapters from server paths is off; the operator enables it with {ALLOWED_FLAG}"
            )
        if "\x00" in lora_path:
            raise InvalidArgument("lora_path must not contain a NUL character")
        directory = Path(lora_path).resolve()  # symlinks and `..` resolved before the check
        if not self._inside(directory):
            raise PermissionDenied(
                f"lora_path {lora_path!r} is outside the directories this server may read ({ALLOWED_FLAG})"
            )
        if not directory.is_dir():
            raise NotFound(f"lora_path {lora_path!r} is not a directory")
        files = []
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_symlink():
                path = path.resolve()
                if not self._inside(path):
                    raise PermissionDenied(
                        f"{entry.name} in {lora_path!r} is a link to a file outside the directories this "
                        f"server may read ({ALLOWED_FLAG}); it was not opened"
                    )
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):  # subdirectories, sockets, ...: not part of an adapter
                continue
            files.append(LocalFile(entry.name, path, st.st_size, (st.st_dev, st.st_ino)))
        refuse_model_files(
            f.name for f in files
        )  # a model's directory is named one, before its count or size
        if len(files) > MAX_FILES:
            raise InvalidArgument(
                f"{lora_path!r} holds {len(files)} files; a PEFT adapter directory has "
                "adapter_config.json and adapter_model.safetensors"
            )
        total = sum(f.size for f in files)
        if total > self.max_bytes:
            raise ResourceExhausted(
                f"the adapter's files are {total} bytes; at most {self.max_bytes} (--max-upload-bytes)"
            )
        return files

    def read(self, files: list[LocalFile]) -> dict[str, bytes]:
        """{name: bytes} of the files `listing` checked."""
        return {f.name: self._read(f) for f in files}

    def _read(self, f: LocalFile) -> bytes:
        changed = PermissionDenied(f"{f.name} changed while it was being loaded; nothing was loaded")
        # O_NONBLOCK: a FIFO swapped in cannot hold the thread; it then fails the identity check
        try:
            fd = os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # ELOOP: a link appeared where the checked file was; or it is gone
            raise changed from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != f.identity:
                raise changed
            data = fh.read(f.size + 1)
        if len(data) != f.size:
            raise changed
        return data
