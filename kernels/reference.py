"""Pure-torch reference of the batched multi-adapter LoRA ops: the test oracle.

Written to be obviously right rather than fast: one masked fp32 matmul per adapter slot, ranks sliced
explicitly, no fused paths. Every other implementation (CPU path, Triton kernels) is tested against it.

Notation (punica style): T tokens, S adapter slots, slot s has real rank r_s <= R_max, s(t) is the slot of
token t (-1 = base model only). Banks are zero-padded beyond r_s; these functions never read that padding.
"""

from __future__ import annotations

import torch


def _used_slots(token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> list[tuple[int, int]]:
    """(slot, rank) for every slot that at least one token uses and that holds a non-empty adapter."""
    ranks = slot_ranks.tolist()
    return [(s, ranks[s]) for s in sorted(set(token_slots.tolist())) if s >= 0 and ranks[s] > 0]


def shrink_reference(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, slot_ranks: torch.Tensor
) -> torch.Tensor:
    """Shrink: ``v[t, :r_s] = x[t] · A[s, :r_s]ᵀ`` with ``s = s(t)``; zero elsewhere and on rows with s = -1.

    x: [T, H_in] fp32/fp16/bf16. lora_a: [S, R_max, H_in], dtype of x. token_slots: [T] int64.
    slot_ranks: [S] int64. Returns v: [T, R_max] float32 (computed in fp32).
    """
    v = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for s, r in _used_slots(token_slots, slot_ranks):
        rows = token_slots == s
        v[rows, :r] = x[rows].float() @ lora_a[s, :r].float().T
    return v


def expand_reference(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """Expand: ``y[t, off:off+H_out] += scale[s] · v[t, :r_s] · B[s, :, :r_s]ᵀ``, s = s(t); s = -1 skipped.

    y: [T, H_total] (in place, any strides), v: [T, R_max] float32, lora_b: [S, H_out, R_max],
    scales: [S] float32, token_slots: [T] int64, slot_ranks: [S] int64, out_offset: int.
    The update is computed in fp32 and rounded once to y's dtype.
    """
    h_out = lora_b.shape[1]
    ys = y[:, out_offset : out_offset + h_out]
    for s, r in _used_slots(token_slots, slot_ranks):
        rows = token_slots == s
        delta = float(scales[s]) * (v[rows, :r] @ lora_b[s, :, :r].float().T)
        ys[rows] = (ys[rows].float() + delta).to(y.dtype)


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """``y[t, off:off+H_out] += scale[s] · (x[t] · A[s, :r_s]ᵀ) · B[s, :, :r_s]ᵀ`` for s = s(t) != -1.

    Shrink then expand, all in fp32. Shapes as in :func:`shrink_reference` and :func:`expand_reference`.
    """
    v = shrink_reference(x, lora_a, token_slots, slot_ranks)
    expand_reference(y, v, lora_b, scales, token_slots, slot_ranks, out_offset)


def add_lora_packed_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    out_offsets: tuple[int, ...],
) -> None:
    """A fused projection's update, slice by slice: for slice i (q, k, v of a fused qkv),
    ``y[t, off_i:off_i+H_i] += scales[i, s] · (x[t] · A[s, iR:iR+r_s]ᵀ) · B_i[s, :, :r_s]ᵀ``.

    lora_a: [S, n·R, H_in] (slice i's A in rows [i·R, i·R + r_s)), lora_bs: n tensors [S, H_i, R],
    scales: [n, S] float32, out_offsets: n ints. Shapes otherwise as in :func:`add_lora_reference`.
    """
    n = len(lora_bs)
    r_max = lora_a.shape[1] // n
    for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
        a = lora_a[:, i * r_max : (i + 1) * r_max]
        add_lora_reference(y, x, a, b, scales[i], token_slots, slot_ranks, off)
