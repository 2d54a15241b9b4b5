"""Triton SGMV shrink/expand: segments of tokens sharing an adapter slot (prefill).

Tokens are visited in slot order (``token_order``); segment g covers positions
``seg_starts[g] : seg_starts[g] + seg_lens[g]`` of that order, all using slot ``seg_slots[g]`` of rank
``r = slot_ranks[slot]``. One program owns a (segment, BLOCK_M rows, column block) tile and runs a
``tl.dot`` loop, so a segment's adapter weights are read once per row block instead of once per token.

Mixed ranks: the rank is read per slot inside the kernel. Shrink programs whose rank block starts past
``r`` exit at once and the rank columns are masked, expand loops over the rank only up to ``r``; a rank-4
adapter next to a rank-64 one therefore moves rank-4 bytes (S-LoRA's per-slot rank, no padding to R_max).

The ``@triton.jit`` bodies are index math only; the launchers check every argument first.
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
    triton_interpreting,
)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, v_ptr, order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr, rank_ptr,
    h_in, stride_xt, stride_as, stride_ar, stride_vt, slice_r, blocks_per_slice,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    part = tl.program_id(2) // blocks_per_slice  # packed banks: slice `part` owns rows [part*slice_r, ...)
    r0 = (tl.program_id(2) % blocks_per_slice) * BLOCK_R
    seg_len = tl.load(seg_len_ptr + seg)
    if m0 >= seg_len:
        return
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(rank_ptr + slot)
    if r0 >= rank:
        return
    start = tl.load(seg_start_ptr + seg)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    tok = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_r += part * slice_r  # row of the packed bank (and column of v)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    a_ptrs = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None]  # [BK, BR] = Aᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, h_in, BLOCK_K):
        k_mask = (k0 + offs_k) < h_in
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            xt, at = xt.to(tl.float32), at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    v_ptrs = v_ptr + (start + offs_m)[:, None] * stride_vt + offs_r[None, :]
    tl.store(v_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _sgmv_expand_kernel(
    v_ptr, b_ptr, y_ptr, scale_ptr, order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr, rank_ptr,
    h_out, out_offset, stride_vt, stride_bs, stride_bn, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    n0 = tl.program_id(2) * BLOCK_N
    seg_len = tl.load(seg_len_ptr + seg)
    if m0 >= seg_len:
        return
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(rank_ptr + slot)
    start = tl.load(seg_start_ptr + seg)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    tok = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < h_out
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = (r0 + offs_r) < rank
        vt = tl.load(
            v_ptr + (start + offs_m)[:, None] * stride_vt + (r0 + offs_r)[None, :],
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # [BM, BR] fp32
        bt = tl.load(
            b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + (r0 + offs_r)[:, None],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [BR, BN] = Bᵀ
        vt = vt.to(bt.dtype)  # the MMA runs in the input dtype, accumulating in fp32
        if UPCAST:
            vt, bt = vt.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(vt, bt, acc, input_precision=PRECISION)
    scale = tl.load(scale_ptr + slot)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + out_offset + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yt.to(tl.float32) + scale * acc).to(y_ptr.dtype.element_ty), mask=mask)


def _block_m(max_segment_len: int) -> int:
    # tl.dot needs M >= 16; longer segments amortise the adapter tile over more rows.
    return 16 if max_segment_len <= 16 else 32 if max_segment_len <= 32 else 64


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _upcast(dtype: torch.dtype) -> bool:
    # The Triton interpreter's tl.dot multiplies bf16 tiles as their raw uint16 bits (triton 3.9), so under
    # the interpreter bf16 tiles go through the dot as fp32 (same values: bf16 -> fp32 is exact).
    return dtype == torch.bfloat16 and triton_interpreting()


def _check_segments(v, token_order, seg_slots, seg_starts, seg_lens, slot_ranks, device, num_slots):
    check_index(token_order=token_order, seg_slots=seg_slots, seg_starts=seg_starts, seg_lens=seg_lens)
    check_index(slot_ranks=slot_ranks)
    if not (seg_slots.shape == seg_starts.shape == seg_lens.shape):
        raise ValueError(
            f"seg_slots, seg_starts, seg_lens must have one entry per segment, got "
            f"{tuple(seg_slots.shape)}, {tuple(seg_starts.shape)}, {tuple(seg_lens.shape)}"
        )
    if slot_ranks.shape != (num_slots,):
        raise ValueError(f"slot_ranks must be [S={num_slots}], got {tuple(slot_ranks.shape)}")
    if v.dim() != 2 or v.dtype != torch.float32 or v.shape[0] != token_order.shape[0]:
        raise ValueError(
            f"v must be [T_lora={token_order.shape[0]}, R_max] float32, got {tuple(v.shape)} {v.dtype}"
        )
    check_row_major(v=v)
    check_same_device(
        device,
        v=v,
        token_order=token_order,
        seg_slots=seg_slots,
        seg_starts=seg_starts,
        seg_lens=seg_lens,
        slot_ranks=slot_ranks,
    )


def sgmv_shrink(
    v: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    token_order: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    slot_ranks: torch.Tensor,
    max_segment_len: int,
    max_rank: int,
    num_slices: int = 1,
) -> None:
    """SGMV shrink: ``v[p, :r] = x[token_order[p]] · A[s, :r]ᵀ`` for p in segment g.

    s = seg_slots[g], r = r_s. With ``num_slices`` n > 1 the bank is packed (a fused projection's slices
    stacked along the rank, slice i in rows [i·R, i·R + r)): v[p, iR:iR+r] = x · A[s, iR:iR+r]ᵀ, one launch.

    v: [T_lora, n·R_max] float32, unit last stride (written; columns past each slice's r untouched),
    x: [T, H_in] fp32/fp16/bf16 (unit last stride), lora_a: [S, n·R_max, H_in] (unit last stride), dtype of x.
    token_order: [T_lora] int64.
    seg_slots, seg_starts, seg_lens: [G] int64. slot_ranks: [S] int64. max_segment_len, max_rank: ints.
    """
    check_shrink_args(v, x, lora_a)
    _check_segments(v, token_order, seg_slots, seg_starts, seg_lens, slot_ranks, x.device, lora_a.shape[0])
    slice_r = check_slices(lora_a, num_slices, max_rank)
    if seg_slots.numel() == 0 or max_segment_len <= 0 or max_rank <= 0:
        return
    block_m, block_r, block_k = _block_m(max_segment_len), 16 if max_rank <= 16 else 32, 64
    per_slice = triton.cdiv(max_rank, block_r)
    grid = (seg_slots.shape[0], triton.cdiv(max_segment_len, block_m), per_slice * num_slices)
    _sgmv_shrink_kernel[grid](
        x, lora_a, v, token_order, seg_slots, seg_starts, seg_lens, slot_ranks,
        x.shape[1], x.stride(0), lora_a.stride(0), lora_a.stride(1), v.stride(0), slice_r, per_slice,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, PRECISION=_precision(x.dtype),
        UPCAST=_upcast(x.dtype),
    )  # fmt: skip


def sgmv_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    token_order: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    slot_ranks: torch.Tensor,
    max_segment_len: int,
    out_offset: int = 0,
) -> None:
    """SGMV expand: ``y[token_order[p], off:off+H_out] += scale[s] · v[p, :r] · B[s, :, :r]ᵀ``.

    p in segment g, s = seg_slots[g], r = r_s.

    y: [T, H_total] (in place, rows may be strided, unit last stride), v: [T_lora, R_max] float32 (unit last
    stride: a packed shrink's v is expanded slice by slice as column views), lora_b: [S, H_out, R_max] (unit
    last stride), dtype of y. scales: [S] float32. token_order: [T_lora] int64.
    seg_slots, seg_starts, seg_lens: [G] int64. slot_ranks: [S] int64. max_segment_len, out_offset: ints.
    """
    check_expand_args(y, v, lora_b, scales, out_offset)
    _check_segments(v, token_order, seg_slots, seg_starts, seg_lens, slot_ranks, y.device, lora_b.shape[0])
    if seg_slots.numel() == 0 or max_segment_len <= 0:
        return
    h_out = lora_b.shape[1]
    block_m, block_n, block_r = _block_m(max_segment_len), 64, 16
    grid = (seg_slots.shape[0], triton.cdiv(max_segment_len, block_m), triton.cdiv(h_out, block_n))
    _sgmv_expand_kernel[grid](
        v, lora_b, y, scales, token_order, seg_slots, seg_starts, seg_lens, slot_ranks,
        h_out, out_offset, v.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=_precision(y.dtype),
        UPCAST=_upcast(y.dtype),
    )  # fmt: skip
