"""hotlora's C kernels for the CPU (`kernels/csrc/*.c`): built with the system C compiler on first use and
loaded with ctypes.

The shared object goes into the user cache directory (`~/.cache/hotlora/kernels/`), named by a hash of the
source and the flags, so an edited source is rebuilt and processes share one build. OpenMP resolves to the
libgomp torch has already loaded: one thread pool, not two fighting over the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("hotlora.kernels")
CSRC = Path(__file__).with_name("csrc")
# -ffp-contract=off: a multiply and an add written apart stay two roundings, as in torch's ops
FLAGS = (
    "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared",
    "-fPIC", "-lm",
)  # fmt: skip
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")


class Unavailable(RuntimeError):
    """This machine cannot run the C kernels; the message says why."""


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (avx512f, avx512_bf16, ...), or None where unreadable."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return None


def unavailable_reason() -> str | None:
    """None when the C kernels can run here; otherwise what is missing."""
    flags = cpu_flags()
    if flags is None:
        return "the CPU's flags cannot be read from /proc/cpuinfo"
    missing = [f for f in NEEDED_CPU_FLAGS if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if compiler() is None:
        return "no C compiler (cc, gcc or $CC) to build the kernel"
    return None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hotlora" / "kernels"


@functools.cache
def library(name: str) -> ctypes.CDLL:
    """`csrc/{name}.c`, built if needed, loaded. Raises Unavailable with the reason."""
    why = unavailable_reason()
    if why is not None:
        raise Unavailable(f"hotlora's CPU kernel {name} cannot run here: {why}")
    source_path = CSRC / f"{name}.c"
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # what the sources include
    digest = hashlib.sha256(source_path.read_bytes() + headers + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # built beside the target, then renamed: a process building at the same time never loads half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        started = time.monotonic()
        log.info("building the C kernel %s (once: kept in %s)", name, target.parent)
        try:
            done = subprocess.run(
                [compiler(), *FLAGS[:-1], "-o", tmp, str(source_path), FLAGS[-1]],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise Unavailable(f"building {source_path.name} failed:\n{done.stderr.strip()}")
            os.replace(tmp, target)
            log.info("built the C kernel %s in %.2f s", name, time.monotonic() - started)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def loads_or_warns(load, fallback: str) -> bool:
    """Whether `load()` (a kernel module's library loader) succeeds; if not, one warning naming the torch
    path that serves instead (`fallback`) and the reason. The torch paths are correct too, only slower."""
    try:
        load()
    except Unavailable as exc:
        log.warning("%s: %s", fallback, exc)
        return False
    return True
