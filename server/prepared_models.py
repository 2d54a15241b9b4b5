"""Prepared copies of models in the per-user cache (`--cache-dir`, default ~/.cache/hotlora/models): made
once, shared by every data dir and every server on the machine.

A copy is a directory named by what it was made from (a hash), made in a temporary directory under a lock
(parallel servers -- tests -- make it once, not once each) and renamed into place with a `.complete` mark
last: a crash midway leaves no copy that looks finished. Three kinds: the default model dequantized from
its GGUF file, a GGUF file's config and tokenizer, and a checkpoint's blocks under --quantize.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("hotlora.model")


def prepared(cache_dir: str | Path, name: str, make: Callable[[Path], None], what: str) -> Path:
    """`cache_dir/models/name`, made by `make(tmp_dir)` unless complete already."""
    root = Path(cache_dir) / "models"
    target = root / name
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").is_file():
            return target
        t0 = time.monotonic()
        log.info("preparing %s once into %s", what, target)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            make(tmp)
            (tmp / ".complete").write_text(name + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s prepared in %.1f s", what, time.monotonic() - t0)
    return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(cache_dir: str | Path, files: list[Path]) -> str:
    """sha256 over the files' contents, remembered by (path, size, mtime, inode) in the cache so that a
    restart does not read gigabytes of weights again; a file written since is hashed again."""
    memo_path = Path(cache_dir) / "models" / ".hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h, changed = hashlib.sha256(), False
    for f in sorted(files):
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in memo:
            memo[key] = sha256_file(f)
            changed = True
        h.update(f"{f.name}:{memo[key]}\n".encode())
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return h.hexdigest()
