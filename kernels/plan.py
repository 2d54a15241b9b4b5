"""LoraPlan: what every backend's per-forward-pass plan holds, and the host-side grouping two of them share.

A backend builds its plan once per forward pass (``backend.plan``) and every wrapped linear layer reuses it,
so sorting and index building (and the device->host read they need) are paid once, not once per layer. Each
backend plans only what it reads: the CPU path a :class:`~.cpu_plan.SegmentPlan` (host ints, strategies), the
Triton kernels a :class:`~.triton_plan.SgmvPlan` (index tensors on the device) or, for a decode step
captured as a CUDA graph, a :class:`~.triton_plan.RowsPlan` (nothing read back to the host at all).

Tokens with a slot are put in *slot order* (a stable sort by slot): the tokens of one slot then form one
contiguous segment. Tokens of slot -1, and tokens of a slot whose rank is 0 (an empty slot), belong to no
segment and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraPlan:
    """Which slot each token uses: the fields every plan has (the reference backend needs no more)."""

    token_slots: torch.Tensor  # [T] int64, slot per token, -1 = base only (compute device)
    slot_ranks: torch.Tensor  # [S] int64, real rank per slot
    num_tokens: int  # T
    max_rank: int  # largest rank among used slots (a graph-safe plan: the bank's R_max)
    has_lora: bool  # False: every add_lora call returns at once


@dataclass(frozen=True)
class SlotOrder:
    """The tokens that get a LoRA update, sorted by slot, as host tensors (built by :func:`sort_by_slot`)."""

    num_tokens: int  # T
    ranks: torch.Tensor  # [S] int64, real rank per slot
    order: torch.Tensor  # [T_lora] int64, token indices in slot order
    sorted_slots: torch.Tensor  # [T_lora] int64, slot of order[i]
    seg_slots: torch.Tensor  # [G] int64, slot of each segment
    seg_starts: torch.Tensor  # [G] int64, segment start in order
    seg_lens: torch.Tensor  # [G] int64, tokens per segment

    @property
    def max_rank(self) -> int:
        return int(self.ranks[self.seg_slots].max()) if self.seg_slots.numel() else 0

    @property
    def max_segment_len(self) -> int:
        return int(self.seg_lens.max()) if self.seg_lens.numel() else 0


def sort_by_slot(token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> SlotOrder:
    """token_slots: [T] int64 (slot per token, -1 = base only), on the compute device.
    slot_ranks: [S] int64, the real rank of each slot (0 = empty slot); may live on CPU.
    Checks both, reads them back to the host once and groups the tokens that get LoRA by slot."""
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
    sorted_slots, perm = torch.sort(slots_host[active_tokens], stable=True)
    seg_slots, seg_lens = torch.unique_consecutive(sorted_slots, return_counts=True)
    return SlotOrder(
        num_tokens=slots_host.numel(),
        ranks=ranks_host,
        order=active_tokens[perm],
        sorted_slots=sorted_slots,
        seg_slots=seg_slots,
        seg_starts=torch.cumsum(seg_lens, 0) - seg_lens,
        seg_lens=seg_lens,
    )


def plan_slots(token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> LoraPlan:
    """The plan of a backend that needs only the slots (the reference): checked, nothing precomputed."""
    grouped = sort_by_slot(token_slots, slot_ranks)
    return LoraPlan(
        token_slots=token_slots,
        slot_ranks=slot_ranks,
        num_tokens=grouped.num_tokens,
        max_rank=grouped.max_rank,
        has_lora=grouped.seg_slots.numel() > 0,
    )


def check_graph_plan_args(token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> None:
    """The arguments of ``backend.graph_plan`` (shapes and devices only: their values are not read)."""
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


def graph_slots_plan(token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> LoraPlan:
    """A slots-only plan that reads nothing back: the reference backend's graph plan."""
    check_graph_plan_args(token_slots, slot_ranks, max_rank)
    num_tokens = token_slots.shape[0]
    return LoraPlan(token_slots, slot_ranks, num_tokens, max_rank, has_lora=num_tokens > 0)
