"""One OpenMP team at a time on the CPU: threads that take turns with the cores let go of theirs.

torch's CPU ops and hotlora's C kernels run their parallel regions on GNU OpenMP (libgomp). A thread that
has run one keeps a team of worker threads until it exits. While libgomp manages more threads than the
process may use CPUs, its workers stop spinning between parallel regions and sleep at once, so every region
then pays a futex wake-up. A decode step runs ~300 regions, and on 2 cores one extra team made the 32-adapter
LoRA update 1.7x slower (28 -> 48 ms a step; the base linears too, less).

So a thread that hands the cores to another (the engine and a training loop, each waiting while the other
runs) or that is done with them (the loader, once the model is in) releases its team here. The next
parallel region it runs builds a new one (one thread start, tens of µs)."""

from __future__ import annotations

import ctypes
import functools
import logging

import torch  # noqa: F401  (loaded first: the libgomp looked for is the one torch runs on)

log = logging.getLogger("hotlora.kernels")


def release_thread_team() -> None:
    """Free the calling thread's OpenMP worker threads (OpenMP 5's omp_pause_resource_all, which libgomp
    implements as exactly that). A no-op where torch does not run on libgomp; inside a parallel region
    libgomp refuses, and nothing changes."""
    pause = _pause()
    if pause is not None:
        pause(1)  # omp_pause_soft


@functools.cache
def _pause():
    path = _loaded_libgomp()
    if path is None:
        return None
    try:
        fn = ctypes.CDLL(path).omp_pause_resource_all
    except (OSError, AttributeError):  # an OpenMP before 5.0: teams stay until their thread exits
        log.info("libgomp at %s cannot release a thread's team (no omp_pause_resource_all)", path)
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _loaded_libgomp() -> str | None:
    """The libgomp this process has loaded (torch's own copy), by its path in /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libgomp" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None
