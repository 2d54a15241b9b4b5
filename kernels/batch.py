"""LoraBatch: the per-forward-pass description of which adapter slot every token uses.

Built once per forward pass by :func:`make_lora_batch` and shared by every wrapped linear layer, so the
sorting, segmenting and index building (and the one device->host sync they need) are paid once, not once per
layer. Fields are tensors and ints only.

Tokens with a slot are put in *slot order* (a stable sort by slot): the tokens of one slot then form one
contiguous segment of ``token_order``. Tokens of slot -1, and tokens of a slot whose rank is 0 (an
empty slot), belong to no segment and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """One run of tokens sharing an adapter slot, as host ints (for the CPU path's Python loop)."""

    slot: int
    start: int  # first position in LoraBatch.token_order
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
class LoraBatch:
    """Which slot each token uses, grouped for the kernels. Build with :func:`make_lora_batch`."""

    token_slots: torch.Tensor  # [T] int64, slot per token, -1 = base only (compute device)
    num_tokens: int  # T
    num_lora_tokens: int  # T_lora: tokens that get a LoRA update
    has_lora: bool  # False: every add_lora call returns at once
    single_slot: int  # the slot when all T tokens use one non-empty slot, else -1
    token_order: torch.Tensor  # [T_lora] int64, token indices in slot order (compute device)
    sorted_slots: torch.Tensor  # [T_lora] int64, slot of token_order[i] (compute device)
    seg_slots: torch.Tensor  # [G] int64, slot of each segment (compute device)
    seg_starts: torch.Tensor  # [G] int64, segment start in token_order (compute device)
    seg_lens: torch.Tensor  # [G] int64, tokens per segment (compute device)
    slot_ranks: torch.Tensor  # [S] int64, real rank per slot (compute device)
    max_segment_len: int  # longest segment (0 without LoRA tokens)
    max_rank: int  # largest rank among used slots
    segments: tuple[Segment, ...]  # the G segments as host ints
    segments_are_slices: bool  # every segment is a contiguous token range: no gather/scatter needed
    rank_groups: tuple[RankGroup, ...]  # tokens grouped by their slot's rank
    # Dense plan (CPU "dense" strategy): set when every used slot has one rank, the used slots nearly fill
    # the range [dense_lo, dense_lo + dense_span) and segments are short (decode). Then the bank slices
    # A[lo:lo+span] are used as views in one bmm, instead of gathering a copy of every token's A and B.
    dense_lo: int = -1
    dense_span: int = 0
    dense_rows: int = 0  # rows per slot in the dense layout (longest segment)
    dense_index: torch.Tensor | None = None  # [T_lora] int64: (slot - lo) * rows + position in segment
    # Decode fast path: every slot of the range has exactly one token. dense_tokens[j] is the token of
    # slot lo + j; dense_in_order means that is simply token j (no gather or scatter at all).
    dense_tokens: torch.Tensor | None = None  # [span] int64
    dense_in_order: bool = False
    # when every token has a slot (T == span): dense_slot_of[t] = t's slot - lo, so the update is
    # a gather + add instead of index_add_ (which is slow on CPU in the model's forward)
    dense_slot_of: torch.Tensor | None = None  # [T] int64
    # every token has a slot: token_rank[t] = t's position in token_order (scatter = gather + add)
    token_rank: torch.Tensor | None = None  # [T] int64
    # Graph-safe plan (make_rows_batch): every token is a row of its own, in token order, slot -1 included;
    # nothing was read back to the host, so only the row kernels (BGMV) and the reference may use it.
    rows_only: bool = False

    @property
    def num_segments(self) -> int:
        return len(self.segments)


def make_lora_batch(token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> LoraBatch:
    """token_slots: [T] int64 (slot per token, -1 = base only), on the compute device.
    slot_ranks: [S] int64, the real rank of each slot (0 = empty slot); may live on CPU.
    Precompute everything every layer needs (segments, gather indices...) here, once."""
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
    if slot_ranks.dim() != 1:
        raise ValueError(f"slot_ranks must be 1-D [S], got shape {tuple(slot_ranks.shape)}")
    if token_slots.dtype not in (torch.int64, torch.int32) or slot_ranks.dtype not in (
        torch.int64,
        torch.int32,
    ):
        raise ValueError(
            f"token_slots and slot_ranks must be int64 (or int32), "
            f"got {token_slots.dtype} / {slot_ranks.dtype}"
        )
    device = token_slots.device
    slots_host = token_slots.detach().to("cpu", torch.int64)
    ranks_host = slot_ranks.detach().to("cpu", torch.int64)
    num_slots = ranks_host.numel()
    if slots_host.numel() and (int(slots_host.min()) < -1 or int(slots_host.max()) >= num_slots):
        raise ValueError(f"token_slots must lie in [-1, {num_slots - 1}] for {num_slots} slots")
    if ranks_host.numel() and int(ranks_host.min()) < 0:
        raise ValueError("slot_ranks must be >= 0")

    # A token gets LoRA when its slot is set and holds a non-empty adapter.
    active = slots_host >= 0
    active &= ranks_host.index_select(0, slots_host.clamp(min=0)) > 0
    active_tokens = torch.nonzero(active).flatten()
    active_slots = slots_host[active_tokens]
    active_slots, perm = torch.sort(active_slots, stable=True)
    order_host = active_tokens[perm]
    seg_slots_host, seg_lens_host = torch.unique_consecutive(active_slots, return_counts=True)
    seg_starts_host = torch.cumsum(seg_lens_host, 0) - seg_lens_host

    order = order_host.tolist()
    segments = []
    for slot, start, length in zip(
        seg_slots_host.tolist(), seg_starts_host.tolist(), seg_lens_host.tolist(), strict=True
    ):
        first, last = order[start], order[start + length - 1]
        # Stable sort keeps a slot's tokens increasing, so first..last spanning `length` means contiguous.
        token_start = first if last - first == length - 1 else -1
        segments.append(Segment(slot, start, length, int(ranks_host[slot]), token_start))

    ranks_of_tokens = ranks_host[active_slots]
    rank_groups = []
    for rank in sorted(set(ranks_of_tokens.tolist())):
        pick = ranks_of_tokens == rank
        rank_groups.append(RankGroup(rank, order_host[pick].to(device), active_slots[pick].to(device)))

    dense = _dense_plan(segments, rank_groups, len(order), order, slots_host.numel())

    num_tokens = slots_host.numel()
    has_lora = bool(segments)
    single = has_lora and len(segments) == 1 and segments[0].length == num_tokens
    return LoraBatch(
        token_slots=token_slots,
        num_tokens=num_tokens,
        num_lora_tokens=len(order),
        has_lora=has_lora,
        single_slot=segments[0].slot if single else -1,
        token_order=order_host.to(device),
        sorted_slots=active_slots.to(device),
        seg_slots=seg_slots_host.to(device),
        seg_starts=seg_starts_host.to(device),
        seg_lens=seg_lens_host.to(device),
        slot_ranks=ranks_host.to(device),
        max_segment_len=max((s.length for s in segments), default=0),
        max_rank=max((s.rank for s in segments), default=0),
        segments=tuple(segments),
        segments_are_slices=all(s.token_start >= 0 for s in segments),
        rank_groups=tuple(rank_groups),
        dense_lo=dense[0],
        dense_span=dense[1],
        dense_rows=dense[2],
        dense_index=None if dense[3] is None else dense[3].to(device),
        dense_tokens=None if dense[4] is None else dense[4].to(device),
        dense_in_order=dense[5],
        dense_slot_of=None if dense[6] is None else dense[6].to(device),
        token_rank=torch.argsort(order_host).to(device) if len(order) == num_tokens and order else None,
    )


def make_rows_batch(token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> LoraBatch:
    """A plan built without any device->host synchronisation, for a decode step captured as a CUDA graph.

    token_slots: [T] int64 on the compute device (slot per row, -1 = base only), usually a static buffer the
    caller refills before each replay. slot_ranks: [S] int64 on the same device (read by the kernels at run
    time, so installing an adapter needs no new plan). max_rank: the bank's R_max, which sizes the grid;
    programs past a slot's real rank exit at once, so a rank-4 adapter still moves rank-4 bytes.
    Every field depends only on T and max_rank: the launches it leads to are identical from step to step.
    """
    if token_slots.dim() != 1 or slot_ranks.dim() != 1:
        raise ValueError(
            f"token_slots [T] and slot_ranks [S] must be 1-D, got {tuple(token_slots.shape)}, "
            f"{tuple(slot_ranks.shape)}"
        )
    if token_slots.device != slot_ranks.device:
        raise ValueError(
            f"token_slots ({token_slots.device}) and slot_ranks ({slot_ranks.device}) must share a device: "
            "the kernels read both at run time"
        )
    if max_rank <= 0:
        raise ValueError(f"max_rank must be the bank's R_max (> 0), got {max_rank}")
    num_tokens = token_slots.shape[0]
    empty = token_slots.new_empty(0)
    return LoraBatch(
        token_slots=token_slots,
        num_tokens=num_tokens,
        num_lora_tokens=num_tokens,
        has_lora=num_tokens > 0,
        single_slot=-1,
        token_order=_arange(num_tokens, token_slots.device),
        sorted_slots=token_slots,
        seg_slots=empty,
        seg_starts=empty,
        seg_lens=empty,
        slot_ranks=slot_ranks,
        max_segment_len=1,
        max_rank=max_rank,
        segments=(),
        segments_are_slices=False,
        rank_groups=(),
        rows_only=True,
    )


_ARANGE: dict[tuple[int, str], torch.Tensor] = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    # one tensor per (n, device), made once: a captured graph keeps pointing at it
    key = (n, str(device))
    if key not in _ARANGE:
        _ARANGE[key] = torch.arange(n, dtype=torch.int64, device=device)
    return _ARANGE[key]


# The dense layout may waste at most this factor of rows (unused slots in range, short segments).
DENSE_MAX_WASTE = 1.5
DENSE_MAX_ROWS = 4


def _dense_plan(segments: list[Segment], rank_groups: list, num_lora: int, order: list[int], num_tokens: int):
    none = (-1, 0, 0, None, None, False, None)
    if len(segments) < 2 or len(rank_groups) != 1:
        return none
    lo, hi = segments[0].slot, segments[-1].slot
    span, rows = hi - lo + 1, max(s.length for s in segments)
    if rows > DENSE_MAX_ROWS or span * rows > DENSE_MAX_WASTE * num_lora + 2:
        return none
    index = torch.empty(num_lora, dtype=torch.int64)
    for seg in segments:
        base = (seg.slot - lo) * rows
        index[seg.start : seg.start + seg.length] = torch.arange(base, base + seg.length)
    tokens, in_order, slot_of = None, False, None
    if rows == 1 and span == num_lora:  # one token per slot, no gap: order[j] is the token of slot lo + j
        tokens = torch.tensor(order, dtype=torch.int64)
        in_order = num_tokens == span and order == list(range(span))
        if num_tokens == span:
            slot_of = torch.argsort(tokens)
    return lo, span, rows, index, tokens, in_order, slot_of
