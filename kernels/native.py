"""hotlora's C kernels for the CPU (`kernels/csrc`), built on first use into one extension module and
reached through it: `ops().linear_blocks(x, packed, fmt, bias)`, `ops().lora_packed(y, x, slots, ranks,
banks)`, ... Each kernel has one binding (`csrc/bind_*.cpp`, pybind11 on torch's headers, as punica's) that
takes tensors, checks their shapes, dtypes, devices and layouts (ValueError naming the argument), and calls
the C function declared in `csrc/kernels.h`; the GIL is released while it runs.

Build: each `csrc/*.c` (the kernels, with the AVX-512 flags) and `csrc/*.cpp` (the bindings) is compiled to
an object named by a hash of its source, the headers and the flags, and the objects are linked into
`_hotlora_kernels-<hash>.so`, all in the user cache (`~/.cache/hotlora/kernels/`): an edited source rebuilds
only its object, and processes share one build (a file lock: the first builds, the others wait). OpenMP
resolves to the libgomp torch has already loaded: one thread pool, not two fighting over the cores.

Built ahead: `python -m hotlora.kernels DIR` builds the module into DIR, and a process with
`HOTLORA_KERNELS_DIR=DIR` loads it from there with no compiler (the container image ships it so). The
module there is used only if its name carries the hash of these sources, flags and torch version;
otherwise it is built as usual.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("hotlora.kernels")
CSRC = Path(__file__).with_name("csrc")
MODULE = "_hotlora_kernels"
# -ffp-contract=off: a multiply and an add written apart stay two roundings, as in torch's ops
C_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC")
CXX_FLAGS = ("-O2", "-std=c++20", "-fPIC", "-fvisibility=hidden", f"-DTORCH_EXTENSION_NAME={MODULE}")
TORCH_LIBS = ("-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python")
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")
PREBUILT_ENV = "HOTLORA_KERNELS_DIR"


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
    if (compiler() is None or cxx_compiler() is None) and prebuilt() is None:
        where = f" and ${PREBUILT_ENV} holds no build of these sources" * bool(os.environ.get(PREBUILT_ENV))
        return f"no C and C++ compiler (cc/gcc and c++/g++, or $CC and $CXX) to build the kernels{where}"
    return None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cxx_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hotlora" / "kernels"


@functools.cache
def ops() -> ModuleType:
    """The kernels' extension module, built if needed, loaded once a process. Raises Unavailable."""
    why = unavailable_reason()
    if why is not None:
        raise Unavailable(f"hotlora's CPU kernels cannot run here: {why}")
    # loaded a second time (this file imported under another name), Python gives the same module
    path = prebuilt() or build(cache_dir())
    spec = importlib.util.spec_from_file_location(
        MODULE, path, loader=importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def available() -> bool:
    """Whether the kernels run here; if not, one warning with the reason (torch ops serve instead: correct,
    only slower)."""
    try:
        ops()
    except Unavailable as exc:
        log.warning("%s; torch ops serve instead", exc)
        return False
    return True


def _objects() -> dict[Path, tuple[str, list[str]]]:
    """Each source and (its object's file name, the command that compiles it): the name carries the hash
    of the source, the headers it includes, the flags and torch's version (whose headers the bindings
    compile against)."""
    torch_dir = Path(torch.__file__).parent
    out = {}
    for source in sorted(CSRC.glob("*.c")) + sorted(CSRC.glob("*.cpp")):
        if source.suffix == ".c":
            flags = [*C_FLAGS]
            cmd = [compiler(), *flags]
        else:
            includes = [torch_dir / "include", sysconfig.get_paths()["include"]]
            flags = [*CXX_FLAGS, *(f"-isystem{p}" for p in includes)]
            cmd = [cxx_compiler(), *flags]
        headers = b"".join(h.read_bytes() for h in sorted(_headers(source)))
        key = source.read_bytes() + headers + " ".join(flags).encode() + torch.__version__.encode()
        out[source] = (f"{source.stem}-{_digest(key)}.o", cmd)
    return out


def module_name() -> str:
    """`_hotlora_kernels-{hash}.so`: the hash covers every object's (sources, headers, flags, torch)."""
    return f"{MODULE}-{_digest(''.join(name for name, _ in _objects().values()).encode())}.so"


def prebuilt() -> Path | None:
    """The module in $HOTLORA_KERNELS_DIR, if one was built there from these sources."""
    folder = os.environ.get(PREBUILT_ENV)
    path = Path(folder) / module_name() if folder else None
    return path if path is not None and path.is_file() else None


def build(folder: Path) -> Path:
    """The module built into `folder` (its objects in folder/obj), kept if already there; raises
    Unavailable when a compiler is missing or fails."""
    objects = _objects()
    target = folder / module_name()
    if target.is_file():
        return target
    if compiler() is None or cxx_compiler() is None:
        raise Unavailable("no C and C++ compiler (cc/gcc and c++/g++, or $CC and $CXX) to build the kernels")
    (folder / "obj").mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds; the others find its result
        if target.is_file():
            return target
        missing = [
            (s, folder / "obj" / o, cmd)
            for s, (o, cmd) in objects.items()
            if not (folder / "obj" / o).is_file()
        ]
        started = time.monotonic()
        log.info(
            "building hotlora's C kernels (%d of %d sources; once: kept in %s)",
            len(missing),
            len(objects),
            folder,
        )
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for _ in pool.map(lambda m: _run([*m[2], "-c", str(m[0])], m[1], m[0].name), missing):
                pass
        link = [
            cxx_compiler(), "-shared", "-fopenmp", *(str(folder / "obj" / o) for o, _ in objects.values()),
            f"-L{Path(torch.__file__).parent / 'lib'}", *TORCH_LIBS, "-lm",
        ]  # fmt: skip
        _run(link, target, "the link")
        log.info("built hotlora's C kernels in %.2f s", time.monotonic() - started)
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m hotlora.kernels DIR`: build the kernels' module into DIR (for $HOTLORA_KERNELS_DIR)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        path = build(args.folder)
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ({path.stat().st_size:,} bytes, {time.monotonic() - start:.1f} s)", flush=True)
    return 0


def _headers(source: Path, seen: set[Path] | None = None) -> set[Path]:
    """The csrc headers `source` includes, directly or through another (what its object depends on)."""
    seen = set() if seen is None else seen
    for line in source.read_text().splitlines():
        if line.startswith('#include "'):
            header = CSRC / line.split('"')[1]
            if header not in seen:
                seen.add(header)
                _headers(header, seen)
    return seen


def _run(cmd: list[str], target: Path, what: str) -> None:
    """Run a compiler writing `target` through a file beside it, renamed when whole: a process that
    looks at the same time never loads half a file."""
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise Unavailable(f"building hotlora's CPU kernels failed at {what}:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600: other users of a shared folder load it too
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
