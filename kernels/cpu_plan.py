"""CpuPlan: the CPU backend's plan of one forward pass (:func:`plan_cpu`), with the step's route decided once.

The route is one of :class:`CpuRoute`: the C kernel (`lora_packed`, kernels/csrc/lora_decode.c), or one of
the torch strategies of kernels/cpu.py, picked by the batch's shape (the thresholds are measured there).
Every LoRA site of the step applies that route; none decides again.

For the kernel the plan holds the slots and ranks as it reads them (int64, contiguous) and the slots the
weight kernels prefetch for it (`StepSlots`); for a torch strategy, the :class:`SegmentPlan`: the segments
(for the per-segment GEMMs), the rank groups (for gather + bmm) and, for decode batches over a nearly full
slot range, the dense layout (for bmm on bank views), as host ints or small index tensors. None of it is
built for the Triton kernels, which have their own plans (kernels.triton_plan).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .native import ops
from .plan import LoraPlan, SlotOrder, sort_by_slot


class CpuRoute(enum.Enum):
    """How a step's LoRA update runs on the CPU (kernels/cpu.py)."""

    KERNEL = "kernel"  # the C kernel: each run of tokens on one slot reads its adapter in place
    SINGLE = "single"  # one adapter for every token: two GEMMs
    SEGMENTS = "segments"  # one GEMM pair per run of tokens on one slot
    DENSE = "dense"  # decode over a nearly full slot range of one rank: bmm on bank views
    BMM = "bmm"  # tokens grouped by rank: gather each token's A and B, batched GEMVs


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
    """Tokens grouped by slot for the torch strategies. Build with :func:`plan_segments`."""

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
class CpuPlan(LoraPlan):
    """The CPU backend's plan: the route every site of the step applies, and what that route reads."""

    route: CpuRoute
    slots: torch.Tensor  # [T] int64 contiguous: token_slots as the kernel reads them
    ranks: torch.Tensor  # [S] int64 contiguous: slot_ranks as the kernel reads them
    # the kernel's route: the slots the update reads, for the weight kernel before each site to prefetch
    # (ops().StepSlots; None for a single row, whose base product streams its own weights)
    ahead: object | None
    segments: SegmentPlan | None  # a torch route's grouping (None on the kernel's route)


# Mean tokens per segment at or above which one GEMM pair per segment beats gather + bmm.
SEGMENT_MIN_MEAN_LEN = 4
# Up to this many segments the per-segment loop is cheap enough whatever their length.
SEGMENT_MAX_SHORT = 2
# Where the C kernel beats torch's GEMMs (benchmarks/kernels.py, 2 threads, SmolLM2 shapes): it reads each
# run of tokens on one slot once and keeps those rows in cache for the run, at ~75 GFLOPS; torch pays ~10 µs
# of dispatch per op and per segment but runs long segments at GEMM speed. Measured crossovers: one adapter,
# 32-48 tokens; many adapters, 64-96 tokens per segment (32 prompts of 14 tokens: 2.8x faster in C).
KERNEL_SINGLE_MAX_TOKENS = 32
KERNEL_MAX_MEAN_SEGMENT = 64


def plan_cpu(
    token_slots: torch.Tensor, slot_ranks: torch.Tensor, kernel: bool, forced: CpuRoute | None = None
) -> CpuPlan:
    """The plan of one forward pass. `kernel`: whether the C kernel may serve (the backend's, decided once);
    `forced`: a route to take where it applies (tests, benchmarks): the kernel where it may serve, the
    single route for one adapter only, the dense one where the layout allows."""
    grouped = sort_by_slot(token_slots, slot_ranks)
    route = choose_route(grouped, kernel, forced)
    slots = token_slots.to(torch.int64).contiguous()
    ranks = grouped.ranks.contiguous()  # int64, on the host
    has_lora = grouped.seg_slots.numel() > 0
    if route is CpuRoute.KERNEL:
        ahead = ops().StepSlots(slots, ranks) if has_lora and grouped.num_tokens >= 2 else None
        segments = None
    else:
        ahead, segments = None, plan_segments(token_slots, slot_ranks, grouped)
        if route is CpuRoute.DENSE and segments.dense is None:
            route = CpuRoute.BMM
    return CpuPlan(
        token_slots=token_slots,
        slot_ranks=slot_ranks,
        num_tokens=grouped.num_tokens,
        max_rank=grouped.max_rank,
        has_lora=has_lora,
        route=route,
        slots=slots,
        ranks=ranks,
        ahead=ahead,
        segments=segments,
    )


def choose_route(grouped: SlotOrder, kernel: bool, forced: CpuRoute | None = None) -> CpuRoute:
    """The route for a batch of this shape (DENSE: where its layout allows, else BMM; plan_cpu checks)."""
    groups, lora_tokens = grouped.seg_slots.numel(), grouped.order.numel()
    single = groups == 1 and lora_tokens == grouped.num_tokens
    if single:
        by_shape = CpuRoute.SINGLE
    elif groups <= SEGMENT_MAX_SHORT or lora_tokens >= SEGMENT_MIN_MEAN_LEN * groups:
        by_shape = CpuRoute.SEGMENTS
    else:
        by_shape = CpuRoute.DENSE
    if forced is CpuRoute.SINGLE and not single:
        forced = CpuRoute.SEGMENTS
    if forced is not None and forced is not CpuRoute.KERNEL:
        return forced
    wins = _kernel_wins(by_shape, lora_tokens, groups, grouped.num_tokens)
    if kernel and (forced is CpuRoute.KERNEL or wins):
        return CpuRoute.KERNEL
    return by_shape


def _kernel_wins(by_shape: CpuRoute, lora_tokens: int, groups: int, tokens: int) -> bool:
    if by_shape is CpuRoute.SINGLE:
        return tokens <= KERNEL_SINGLE_MAX_TOKENS
    if by_shape is CpuRoute.SEGMENTS:
        return lora_tokens <= KERNEL_MAX_MEAN_SEGMENT * groups
    return True  # the short segments of decode batches: the bmm strategies' job, done better in C


def plan_segments(
    token_slots: torch.Tensor, slot_ranks: torch.Tensor, grouped: SlotOrder | None = None
) -> SegmentPlan:
    """token_slots: [T] int64 (slot per token, -1 = base only), on the compute device.
    slot_ranks: [S] int64, the real rank of each slot (0 = empty slot); may live on CPU.
    Precompute everything the torch strategies need (segments, gather indices...) here, once. `grouped`:
    sort_by_slot's result when the caller has it."""
    grouped = grouped if grouped is not None else sort_by_slot(token_slots, slot_ranks)
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
