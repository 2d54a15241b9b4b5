"""Triton BGMV shrink/expand: one adapter index per row (decode).

Row p of the batch is token ``token_order[p]`` with slot ``sorted_slots[p]`` of rank ``r = slot_ranks[slot]``.
One program owns one row and one column block and computes a GEMV with a broadcast multiply and a sum, so
a decode batch of 32 rows on 32 distinct adapters wastes no ``tl.dot`` rows (which need M >= 16).

Mixed ranks: the rank is read per slot; shrink programs past ``r`` exit and expand loops over the rank only
up to ``r``, so each row moves its own adapter's rank worth of bytes (per-slot rank, as in S-LoRA).
Rows are written in the same slot order as the SGMV kernels, so the two families share the v buffer.
A row whose slot is -1 (or an empty slot) exits at once: a graph-safe plan (``RowsPlan``) passes every
row of a fixed-size decode batch in its own order, so the grid and the arguments never depend on host data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .validation import (
    check_expand_args,
    check_index,
    check_row_major,
    check_same_device,
    check_shrink_args,
    check_slices,
)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, v_ptr, order_ptr, row_slot_ptr, rank_ptr,
    h_in, stride_xt, stride_as, stride_ar, stride_vt, slice_r, blocks_per_slice,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    part = tl.program_id(1) // blocks_per_slice  # packed banks: slice `part` owns rows [part*slice_r, ...)
    r0 = (tl.program_id(1) % blocks_per_slice) * BLOCK_R
    slot = tl.load(row_slot_ptr + row)
    if slot < 0:  # a base-only row (graph-safe plans keep them in the grid)
        return
    rank = tl.load(rank_ptr + slot)
    if r0 >= rank:
        return
    tok = tl.load(order_ptr + row)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_r += part * slice_r  # row of the packed bank (and column of v)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, h_in, BLOCK_K):
        k_mask = (k0 + offs_k) < h_in
        xk = tl.load(x_ptr + tok * stride_xt + k0 + offs_k, mask=k_mask, other=0.0)  # [BK]
        at = tl.load(
            a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :],
            mask=r_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # [BR, BK]
        acc += tl.sum(at.to(tl.float32) * xk.to(tl.float32)[None, :], axis=1)
    tl.store(v_ptr + row * stride_vt + offs_r, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(
    v_ptr, b_ptr, y_ptr, scale_ptr, order_ptr, row_slot_ptr, rank_ptr,
    h_out, out_offset, stride_vt, stride_bs, stride_bn, stride_yt,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(row_slot_ptr + row)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if rank == 0:  # an empty slot: its rows get nothing
        return
    tok = tl.load(order_ptr + row)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < h_out
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = (r0 + offs_r) < rank
        vr = tl.load(v_ptr + row * stride_vt + r0 + offs_r, mask=r_mask, other=0.0)  # [BR] fp32
        bt = tl.load(
            b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + (r0 + offs_r)[None, :],
            mask=n_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # [BN, BR]
        acc += tl.sum(bt.to(tl.float32) * vr[None, :], axis=1)
    scale = tl.load(scale_ptr + slot)
    y_ptrs = y_ptr + tok * stride_yt + out_offset + offs_n
    yt = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (yt.to(tl.float32) + scale * acc).to(y_ptr.dtype.element_ty), mask=n_mask)


def _check_rows(v, token_order, sorted_slots, slot_ranks, device, num_slots) -> None:
    check_index(token_order=token_order, sorted_slots=sorted_slots, slot_ranks=slot_ranks)
    if sorted_slots.shape != token_order.shape:
        raise ValueError(
            f"sorted_slots must give one slot per row of token_order {tuple(token_order.shape)}, "
            f"got {tuple(sorted_slots.shape)}"
        )
    if slot_ranks.shape != (num_slots,):
        raise ValueError(f"slot_ranks must be [S={num_slots}], got {tuple(slot_ranks.shape)}")
    if v.dim() != 2 or v.dtype != torch.float32 or v.shape[0] != token_order.shape[0]:
        raise ValueError(
            f"v must be [T_lora={token_order.shape[0]}, R_max] float32, got {tuple(v.shape)} {v.dtype}"
        )
    check_row_major(v=v)
    check_same_device(device, v=v, token_order=token_order, sorted_slots=sorted_slots, slot_ranks=slot_ranks)


def bgmv_shrink(
    v: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    token_order: torch.Tensor,
    sorted_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    max_rank: int,
    num_slices: int = 1,
) -> None:
    """BGMV shrink: ``v[p, :r] = x[token_order[p]] · A[s, :r]ᵀ`` with s = sorted_slots[p], r = r_s.
    A packed bank (``num_slices`` n > 1, slice i in rows [i·R, i·R + r)) is shrunk in the same launch.

    v: [T_lora, n·R_max] float32, unit last stride (written; columns past each slice's r untouched),
    x: [T, H_in] fp32/fp16/bf16 (unit last stride), lora_a: [S, n·R_max, H_in] (unit last stride), dtype of x.
    token_order, sorted_slots: [T_lora] int64
    (-1 = skip the row). slot_ranks: [S] int64. max_rank: int, the largest r_s among the rows (or the bank's
    R_max: programs past a slot's rank exit at once).
    """
    check_shrink_args(v, x, lora_a)
    _check_rows(v, token_order, sorted_slots, slot_ranks, x.device, lora_a.shape[0])
    slice_r = check_slices(lora_a, num_slices, max_rank)
    if token_order.numel() == 0 or max_rank <= 0:
        return
    block_r, block_k = 16, 128
    per_slice = triton.cdiv(max_rank, block_r)
    grid = (token_order.shape[0], per_slice * num_slices)
    _bgmv_shrink_kernel[grid](
        x, lora_a, v, token_order, sorted_slots, slot_ranks,
        x.shape[1], x.stride(0), lora_a.stride(0), lora_a.stride(1), v.stride(0), slice_r, per_slice,
        BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip


def bgmv_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    token_order: torch.Tensor,
    sorted_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """BGMV expand: ``y[token_order[p], off:off+H_out] += scale[s] · v[p, :r] · B[s, :, :r]ᵀ``.

    s = sorted_slots[p], r = r_s.

    y: [T, H_total] (in place, rows may be strided, unit last stride), v: [T_lora, R_max] float32 (unit
    last stride), lora_b: [S, H_out, R_max] (unit last stride), dtype of y. scales: [S] float32.
    token_order, sorted_slots: [T_lora] int64. slot_ranks: [S] int64. out_offset: int.
    """
    check_expand_args(y, v, lora_b, scales, out_offset)
    _check_rows(v, token_order, sorted_slots, slot_ranks, y.device, lora_b.shape[0])
    if token_order.numel() == 0:
        return
    h_out = lora_b.shape[1]
    block_n, block_r = 128 if h_out >= 128 else 64, 16
    grid = (token_order.shape[0], triton.cdiv(h_out, block_n))
    _bgmv_expand_kernel[grid](
        v, lora_b, y, scales, token_order, sorted_slots, slot_ranks,
        h_out, out_offset, v.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
