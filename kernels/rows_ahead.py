"""What a LoRA site's update will read next, for the base product before it to ask for while it computes
(`csrc/rows_ahead.h`): at a decode step of many rows the base GEMM keeps the cores busy and leaves the
memory bus idle, and the update after it only streams its adapters' rows; the block and bf16 weight kernels
(`block_weights.linear`, `bf16_weights.linear`, argument `ahead`) prefetch those rows into L2 on the way.

`SiteBanks` describes one site's banks (fixed while they live: kernels.lora_decode.PackedSite builds it),
`StepSlots` one step's slots (shared by its ~120 sites: kernels.cpu works it out once a step, on the
first ask); an `Ahead` pairs
them for one call."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

REGIONS = 8  # AHEAD_REGIONS: a fused projection's A slices and B slices (qkv: 3 + 3)


class BankRegions(ctypes.Structure):
    """Region g of slot s: rank(s) rows of row[g] bytes from base[g] + s * stride[g]."""

    _fields_ = [
        ("count", ctypes.c_int64),
        ("base", ctypes.c_int64 * REGIONS),
        ("stride", ctypes.c_int64 * REGIONS),
        ("row", ctypes.c_int64 * REGIONS),
    ]


class SlotsAhead(ctypes.Structure):
    _fields_ = [("count", ctypes.c_int64), ("slot", ctypes.c_void_p), ("rank", ctypes.c_void_p)]


class SiteBanks:
    """The rows a packed update (lora_decode's layout) reads for a slot: each slice's rank rows of A
    ([S, n·R, in]) in order, then each rank-major B's ([S, out, R] seen over storage [S, R, out]). A B of
    the other layout is read along its whole [out, R] block whatever the rank, so it is left out. The
    caller keeps the banks alive as long as this."""

    def __init__(self, lora_a: torch.Tensor, lora_bs: tuple[torch.Tensor, ...]):
        slices, k, size = len(lora_bs), lora_a.shape[2], lora_a.element_size()
        r_max = lora_a.shape[1] // slices
        regions = [
            (lora_a.data_ptr() + i * r_max * k * size, lora_a.stride(0) * size, k * size)
            for i in range(slices)
        ]
        for b in lora_bs:
            _, out, _ = b.shape
            if b.stride() == (out * r_max, 1, out):  # rank-major: rank row j is `out` contiguous values
                regions.append((b.data_ptr(), b.stride(0) * size, out * size))
        self._struct = BankRegions()
        self._struct.count = min(len(regions), REGIONS)
        for g, (base, stride, row) in enumerate(regions[:REGIONS]):
            self._struct.base[g], self._struct.stride[g], self._struct.row[g] = base, stride, row
        self.address = ctypes.addressof(self._struct)


class StepSlots:
    """The slots a step's update reads, in the order the kernel takes them (ascending slot: its pieces are
    sorted so), those of rank 0 and base rows left out; holds the arrays its structure points into.
    token_slots, slot_ranks: int64, as the kernel route's."""

    def __init__(self, token_slots: torch.Tensor, slot_ranks: torch.Tensor):
        used = torch.unique(token_slots[token_slots >= 0])  # sorted
        ranks = slot_ranks[used]
        keep = ranks > 0
        self._slot = used[keep].contiguous()  # int64, as the route's slots and ranks
        self._rank = ranks[keep].contiguous()
        self._struct = SlotsAhead(self._slot.shape[0], self._slot.data_ptr(), self._rank.data_ptr())
        self.address = ctypes.addressof(self._struct)
        self.count = int(self._slot.shape[0])


class Ahead(NamedTuple):
    """What a weight kernel asks for while it computes: one site's banks, one step's slots (holding them
    keeps their structures alive through the call)."""

    banks: SiteBanks
    slots: StepSlots


def addresses(ahead: Ahead | None) -> tuple[int | None, int | None]:
    """The two pointers a weight kernel takes (NULL, NULL: nothing to ask for)."""
    return (None, None) if ahead is None else (ahead.banks.address, ahead.slots.address)
