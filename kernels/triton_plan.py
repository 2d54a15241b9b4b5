"""The Triton kernels' plans: :class:`SgmvPlan` for an eager forward pass, :class:`RowsPlan` for a decode step
captured as a CUDA graph. Both are index tensors on the compute device and ints; neither holds the CPU path's
host-side segments. This module needs torch only (the kernels import triton, their plans do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import LoraPlan, check_graph_plan_args, sort_by_slot


@dataclass(frozen=True)
class SgmvPlan(LoraPlan):
    """Tokens sorted by slot, with their segments: SGMV reads the segments, BGMV the sorted rows
    (row p is token ``token_order[p]`` of slot ``sorted_slots[p]``). Build with :func:`plan_sgmv`."""

    num_lora_tokens: int  # T_lora: tokens that get a LoRA update (rows of the v buffer)
    token_order: torch.Tensor  # [T_lora] int64, token indices in slot order (compute device)
    sorted_slots: torch.Tensor  # [T_lora] int64, slot of token_order[i] (compute device)
    seg_slots: torch.Tensor  # [G] int64, slot of each segment (compute device)
    seg_starts: torch.Tensor  # [G] int64, segment start in token_order (compute device)
    seg_lens: torch.Tensor  # [G] int64, tokens per segment (compute device)
    max_segment_len: int  # longest segment (0 without LoRA tokens): sizes SGMV's grid

    @property
    def num_segments(self) -> int:
        return self.seg_slots.shape[0]


@dataclass(frozen=True)
class RowsPlan(LoraPlan):
    """Graph-safe: every token is a row of its own, in token order, slot -1 included, and nothing was read
    back to the host, so only the row kernels (BGMV) may use it. Build with :func:`plan_rows`."""

    num_lora_tokens: int  # = T: every row, base-only rows exit at once in the kernels
    token_order: torch.Tensor  # [T] int64, arange(T), one tensor per (T, device): a graph keeps it
    sorted_slots: torch.Tensor  # [T] int64, the token_slots buffer itself, read at run time


def plan_sgmv(
    token_slots: torch.Tensor, slot_ranks: torch.Tensor, device: torch.device | str | None = None
) -> SgmvPlan:
    """token_slots: [T] int64 (slot per token, -1 = base only): on the host (the engine's slot list), so
    nothing is read back from the device, or on the compute device (read back once).
    slot_ranks: [S] int64, the real rank of each slot (0 = empty slot); may live on CPU.
    device: where the plan's index tensors go (None: token_slots' device); sent in one asynchronous copy."""
    grouped = sort_by_slot(token_slots, slot_ranks)
    device = torch.device(device) if device is not None else token_slots.device
    host = torch.cat(
        (
            grouped.ranks,
            token_slots.detach().to("cpu", torch.int64),
            grouped.order,
            grouped.sorted_slots,
            grouped.seg_slots,
            grouped.seg_starts,
            grouped.seg_lens,
        )
    )
    ranks, slots, order, sorted_slots, seg_slots, seg_starts, seg_lens = _to_device(host, device).split(
        [
            grouped.ranks.numel(),
            grouped.num_tokens,
            *(grouped.order.numel(),) * 2,
            *(grouped.seg_slots.numel(),) * 3,
        ]
    )
    return SgmvPlan(
        token_slots=slots,
        slot_ranks=ranks,
        num_tokens=grouped.num_tokens,
        max_rank=grouped.max_rank,
        has_lora=grouped.seg_slots.numel() > 0,
        num_lora_tokens=grouped.order.numel(),
        token_order=order,
        sorted_slots=sorted_slots,
        seg_slots=seg_slots,
        seg_starts=seg_starts,
        seg_lens=seg_lens,
        max_segment_len=grouped.max_segment_len,
    )


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy, and on CUDA from pinned memory without making the host wait for the device's queue."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def plan_rows(token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> RowsPlan:
    """A plan built without any device->host synchronisation, for a decode step captured as a CUDA graph.

    token_slots: [T] int64 on the compute device (slot per row, -1 = base only), usually a static buffer the
    caller refills before each replay. slot_ranks: [S] int64 on the same device (read by the kernels at run
    time, so installing an adapter needs no new plan). max_rank: the bank's R_max, which sizes the grid;
    programs past a slot's real rank exit at once, so a rank-4 adapter still moves rank-4 bytes.
    Every field depends only on T and max_rank: the launches it leads to are identical from step to step.
    """
    check_graph_plan_args(token_slots, slot_ranks, max_rank)
    num_tokens = token_slots.shape[0]
    return RowsPlan(
        token_slots=token_slots,
        slot_ranks=slot_ranks,
        num_tokens=num_tokens,
        max_rank=max_rank,
        has_lora=num_tokens > 0,
        num_lora_tokens=num_tokens,
        token_order=_arange(num_tokens, token_slots.device),
        sorted_slots=token_slots,
    )


_ARANGE: dict[tuple[int, str], torch.Tensor] = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    # one tensor per (n, device), made once: a captured graph keeps pointing at it
    key = (n, str(device))
    if key not in _ARANGE:
        _ARANGE[key] = torch.arange(n, dtype=torch.int64, device=device)
    return _ARANGE[key]
