"""CPU memory backed by transparent huge pages (2 MiB), where Linux offers them to a process that asks.

A decode step streams every weight matrix once. With 4 KiB pages the walk through them misses the TLB every
4 KiB; with 2 MiB pages, once per 2 MiB. Measured on one decode step of SmolLM2-135M at one row (forward
and LM head, 2 threads, three pairs of runs): bf16 weights 13.4-13.9 -> 12.0-12.4 ms (the kernel prefetches
rows ahead, and a prefetch that misses the TLB waits for the page walk); fp32 21.9-22.2 -> 21.4-22.0 ms.
The weights are resident for the model's life, so the larger pages cost no memory beyond rounding the
whole set up to 2 MiB. They cost load time: the copy took loading SmolLM2-135M in fp32 from 0.1-0.2 to
~1.0 s (unmoved, the unfused matrices stay pages of the safetensors file, mapped rather than copied).

The memory is an anonymous mapping advised with MADV_HUGEPAGE (Python's `mmap`); Linux backs it with huge
pages when transparent huge pages are `always` or `madvise` (the common default) and it has free ones, and
with ordinary pages otherwise, so the advice can only help.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ALIGN = 64  # each tensor starts on a cache line


def offered() -> bool:
    """Whether Linux gives a process that asks for them transparent huge pages."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = re.search(r"\[(\w+)\]", THP_MODE.read_text())
    except OSError:
        return False
    return mode is not None and mode.group(1) in ("always", "madvise")


def buffer(nbytes: int) -> torch.Tensor | None:
    """`nbytes` of zeroed uint8 CPU memory starting on a 2 MiB boundary and advised for huge pages; None
    where they are not offered. Views of it keep the mapping alive; it is unmapped when the last one goes."""
    if nbytes <= 0 or not offered():
        return None
    # private: an anonymous mapping is shared by default, and shared memory takes huge pages only where
    # shmem_enabled allows (rarely); one spare huge page for the alignment
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference to the mapping
    start = -whole.data_ptr() % HUGE_PAGE
    mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    return whole[start : start + nbytes]


def room(t: torch.Tensor) -> int:
    """Bytes `t` takes in a buffer, rounded up so the next tensor starts on a cache line."""
    return -(-t.nbytes // ALIGN) * ALIGN


def place(buf: torch.Tensor, offset: int, t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` (same dtype, shape and values, contiguous) at byte `offset` of `buf`."""
    copy = buf[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
    copy.copy_(t)
    return copy
