"""SegmentPlan: the CPU path's plan (kernels.cpu), built by :func:`plan_segments` once per forward pass.

Everything the CPU strategies read is here as host ints or small index tensors: the segments (for the
per-segment GEMMs), the rank groups (for gather + bmm) and, for decode batches over a nearly full slot
range, the dense layout (for bmm on bank views). None of it is built for the Triton kernels, which have their
own plans (kernels.triton_plan).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .plan import LoraPlan, sort_by_slot


@dataclass(frozen=True)
class Segment:
    """One run of tokens sharing an adapter slot, as host ints (for the CPU path's Python loop)."""

    slot: int
    start: int  # first position in SegmentPlan.token_order
    length: int
    rank: int
    token_start: int  # first token index when the segment's tokens are contiguous in x/y, else -1


@dataclass(frozen=True)
class RankGroup:
    """Every token whose slot has rank ``rank``: the unit of the CPU path's gather + bmm strategy."""

    rank: int
    tokens: torch.Tensor  # [n] int64, token indices (compute device)
    slots: torch.Tensor  # [n] int64, slot of each of those tokens (compute device)


@dataclass(frozen=True)
class DenseLayout:
    """The CPU "dense" strategy's layout: every used slot has one rank, the used slots nearly fill the range
    [lo, lo + span) and segments are short (decode). The bank slices A[lo:lo+span] are then used as views in
    one bmm, instead of gathering a copy of every token's A and B."""

    lo: int
    span: int
    rows: int  # rows per slot in the layout (longest segment)
    index: torch.Tensor  # [T_lora] int64: (slot - lo) * rows + position in segment
    # Decode fast path: every slot of the range has exactly one token. tokens[j] is the token of slot lo + j;
    # in_order means that is simply token j (no gather or scatter at all).
    tokens: torch.Tensor | None = None  # [span] int64
    in_order: bool = False
    # when every token has a slot (T == span): slot_of[t] = t's slot - lo, so the update is a gather + add
    # instead of index_add_ (which is slow on CPU in the model's forward)
    slot_of: torch.Tensor | None = None  # [T] int64


@dataclass(frozen=True)
class SegmentPlan(LoraPlan):
    """Tokens grouped by slot for the CPU strategies. Build with :func:`plan_segments`."""

    num_lora_tokens: int  # T_lora: tokens that get a LoRA update
    single_slot: int  # the slot when all T tokens use one non-empty slot, else -1
    token_order: torch.Tensor  # [T_lora] int64, token indices in slot order (compute device)
    segments: tuple[Segment, ...]  # the G segments as host ints
    segments_are_slices: bool  # every segment is a contiguous token range: no gather/scatter needed
    max_segment_len: int  # longest segment (0 without LoRA tokens)
    rank_groups: tuple[RankGroup, ...]  # tokens grouped by their slot's rank
    dense: DenseLayout | None  # set when the dense strategy applies
    # every token has a slot: token_rank[t] = t's position in token_order (scatter = gather + add)
    token_rank: torch.Tensor | None  # [T] int64

    @property
    def num_segments(self) -> int:
        return len(self.segments)


@dataclass(frozen=True)
class SlotsPlan(LoraPlan):
    """The CPU backend's graph plan (a static decode step, runner.decode_graphs): the slots only, nothing
    read back to the host, so torch.compile traces the step without a host read or a graph break. The C
    kernel reads the slots itself; the torch strategies take :attr:`segments`, built on first need."""

    @functools.cached_property
    def segments(self) -> SegmentPlan:
        return plan_segments(self.token_slots, self.slot_ranks)


def plan_segments(token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> SegmentPlan:
    """token_slots: [T] int64 (slot per token, -1 = base only), on the compute device.
    slot_ranks: [S] int64, the real rank of each slot (0 = empty slot); may live on CPU.
    Precompute everything the CPU strategies need (segments, gather indices...) here, once."""
    grouped = sort_by_slot(token_slots, slot_ranks)
    device = token_slots.device
    ranks_host, order_host = grouped.ranks, grouped.order
    order = order_host.tolist()
    segments = []
    for slot, start, length in zip(
        grouped.seg_slots.tolist(), grouped.seg_starts.tolist(), grouped.seg_lens.tolist(), strict=True
    ):
        first, last = order[start], order[start + length - 1]
        # Stable sort keeps a slot's tokens increasing, so first..last spanning `length` means contiguous.
        token_start = first if last - first == length - 1 else -1
        segments.append(Segment(slot, start, length, int(ranks_host[slot]), token_start))

    ranks_of_tokens = ranks_host[grouped.sorted_slots]
    rank_groups = []
    for rank in sorted(set(ranks_of_tokens.tolist())):
        pick = ranks_of_tokens == rank
        rank_groups.append(
            RankGroup(rank, order_host[pick].to(device), grouped.sorted_slots[pick].to(device))
        )

    num_tokens = grouped.num_tokens
    has_lora = bool(segments)
    single = has_lora and len(segments) == 1 and segments[0].length == num_tokens
    return SegmentPlan(
        token_slots=token_slots,
        slot_ranks=ranks_host.to(device),
        num_tokens=num_tokens,
        max_rank=grouped.max_rank,
        has_lora=has_lora,
        num_lora_tokens=len(order),
        single_slot=segments[0].slot if single else -1,
        token_order=order_host.to(device),
        segments=tuple(segments),
        segments_are_slices=all(s.token_start >= 0 for s in segments),
        max_segment_len=grouped.max_segment_len,
        rank_groups=tuple(rank_groups),
        dense=_dense_layout(segments, len(rank_groups), order, num_tokens, device),
        token_rank=torch.argsort(order_host).to(device) if len(order) == num_tokens and order else None,
    )


# The dense layout may waste at most this factor of rows (unused slots in range, short segments).
DENSE_MAX_WASTE = 1.5
DENSE_MAX_ROWS = 4


def _dense_layout(
    segments: list[Segment], num_ranks: int, order: list[int], num_tokens: int, device: torch.device
) -> DenseLayout | None:
    num_lora = len(order)
    if len(segments) < 2 or num_ranks != 1:
        return None
    lo, hi = segments[0].slot, segments[-1].slot
    span, rows = hi - lo + 1, max(s.length for s in segments)
    if rows > DENSE_MAX_ROWS or span * rows > DENSE_MAX_WASTE * num_lora + 2:
        return None
    index = torch.empty(num_lora, dtype=torch.int64)
    for seg in segments:
        base = (seg.slot - lo) * rows
        index[seg.start : seg.start + seg.length] = torch.arange(base, base + seg.length)
    tokens, in_order, slot_of = None, False, None
    if rows == 1 and span == num_lora:  # one token per slot, no gap: order[j] is the token of slot lo + j
        tokens = torch.tensor(order, dtype=torch.int64)
        in_order = num_tokens == span and order == list(range(span))
        if num_tokens == span:
            slot_of = torch.argsort(tokens).to(device)
        tokens = tokens.to(device)
    return DenseLayout(lo, span, rows, index.to(device), tokens, in_order, slot_of)
