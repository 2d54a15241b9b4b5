"""Paged attention in Triton (CUDA; CPU only under TRITON_INTERPRET=1): decode rows and prefill chunks read
their keys and values in place from the paged pool, through their block tables. Nothing is gathered.

decode   ``out[r, h] = softmax_j(scale · q[r, h] · K_r[j]ᵀ) · V_r[j]`` over ``lo_r <= j < lens[r]``, where
         ``lo_r = max(0, lens[r] − window)`` (0 without a window), ``K_r[j] = k_pool[tables[r, j // bs],
         j % bs, h // G]`` and G = heads / kv_heads (GQA; MQA is G = heads). A row of no keys gets zeros.
prefill  chunk c's token i (flat row ``chunks[c, 0] + i``, position ``p = chunks[c, 2] + i``) attends to the
         keys ``max(0, p − window + 1) <= j <= p`` of its own table ``tables[c]``: its cached context and
         the chunk's own keys (written to the pool before attention), causal within the chunk. Every chunk
         of a step is one launch (varlen).

Shapes: q [T, heads, d] (unit last stride; rows and heads may be strided, as views of the fused qkv),
k_pool/v_pool [blocks, bs, kv_heads, d] (bs a power of two), tables int64/int32, out [T, heads, d]. q and
the pools are fp16, bf16 or fp32; scores, softmax and the sums are fp32 (the probabilities are rounded
to the values' dtype for their product, as flash attention does). Keys past a row's length or before its
window are never loaded, so a padded table's null block is never read (only what a table points to
within the length is).

Decode programs own (row, kv head, split): the G query heads of a kv head are scored together against
each tile of keys (one tl.dot of [G, d] x [d, keys], G padded to 16). With few rows and long contexts
the keys are cut into splits whose partial softmaxes a second kernel merges (flash-decoding); the split
count depends only on the shapes (rows, table width), so a captured CUDA graph stays valid.
Prefill programs own (chunk, tile of BLOCK_M tokens, head); programs past a chunk's length exit at once.
The torch reference is `attention_reference.py`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_triton_device, triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, part_ptr, stat_ptr,
    qk_scale, window, head_dim, keys_per_split,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_tt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BS: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + row).to(tl.int32)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    start = tl.maximum(lo, split * keys_per_split)
    end = tl.minimum(length, (split + 1) * keys_per_split)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BG, BD]
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for j0 in range((start // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        pos = j0 + offs_n
        n_mask = (pos >= start) & (pos < end)
        blk = tl.load(table_ptr + row * stride_tt + pos // BS, mask=n_mask, other=0).to(tl.int64)
        slot = pos % BS
        kt = tl.load(
            k_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [BD, BN] = Kᵀ
        vt = tl.load(
            v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BN, BD]
        if UPCAST:
            kt, vt = kt.to(tl.float32), vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BG, BN], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no key yet: no NaN
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m = m_new
    if SPLITS == 1:
        o = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]  # no keys: zeros
        tl.store(
            out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:  # this split's partial sums [rows, heads, SPLITS, BLOCK_D], (max, sum) [rows, heads, SPLITS, 2]
        n_heads = tl.num_programs(1) * GROUP
        cell = (row * n_heads + heads) * SPLITS + split  # [BG]
        tl.store(part_ptr + cell[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(stat_ptr + cell * 2, m, mask=g_mask)
        tl.store(stat_ptr + cell * 2 + 1, l_sum, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr, stat_ptr, out_ptr, head_dim, stride_ot, stride_oh,
    SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    cell = (row * tl.num_programs(1) + head) * SPLITS + tl.arange(0, SPLITS)  # [SPLITS]
    m = tl.load(stat_ptr + cell * 2)
    l_sum = tl.load(stat_ptr + cell * 2 + 1)
    m_all = tl.max(m, axis=0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_use)  # a split of no keys: exp2(-inf) = 0
    total = tl.sum(l_sum * w, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_ptr + cell[:, None] * BLOCK_D + offs_d[None, :])  # [SPLITS, BD]
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < head_dim,
    )


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, chunk_ptr, out_ptr,
    qk_scale, window, head_dim,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_tt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    length = tl.load(chunk_ptr + c * 3 + 1).to(tl.int32)
    if m0 >= length:
        return
    first_row = tl.load(chunk_ptr + c * 3).to(tl.int32)
    context = tl.load(chunk_ptr + c * 3 + 2).to(tl.int32)
    kvh = head // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    qpos = context + offs_m  # [BM] each query's position in its sequence
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = tl.load(
        q_ptr + (first_row + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BM, BD]
    if UPCAST:
        q = q.to(tl.float32)
    # the keys any query of the tile sees: from the first one's window to the last one's own position
    lo = tl.where(window > 0, tl.maximum(context + m0 - window + 1, 0), 0)
    hi = context + tl.minimum(m0 + BLOCK_M, length)  # exclusive
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for j0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = j0 + offs_n
        n_mask = (pos >= lo) & (pos < hi)
        blk = tl.load(table_ptr + c * stride_tt + pos // BS, mask=n_mask, other=0).to(tl.int64)
        slot = pos % BS
        kt = tl.load(
            k_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [BD, BN]
        vt = tl.load(
            v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BN, BD]
        if UPCAST:
            kt, vt = kt.to(tl.float32), vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BM, BN], log2 units
        visible = n_mask[None, :] & (pos[None, :] <= qpos[:, None])
        visible &= (window <= 0) | (pos[None, :] > qpos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m = m_new
    o = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    tl.store(
        out_ptr + (first_row + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


# ---- launchers: every argument checked before anything runs ---------------------------------------------
def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
    out: torch.Tensor,
    splits: int | None = None,
) -> None:
    """Decode attention of D rows, one new query each (formula in the module docstring).

    q: [D, heads, d]; k_pool, v_pool: [blocks, bs, kv_heads, d]; tables: [D, W] int64/int32 (padding
    entries past a row's length are never read); lens: [D] int64/int32, keys each row sees (its own
    included), at most W * bs; out: [D, heads, d] (written). `splits`: how many pieces each row's keys
    are cut into (None: chosen from the shapes alone)."""
    rows, heads, d = _check_common(q, k_pool, v_pool, out, "decode")
    if tables.dim() != 2 or tables.shape[0] != rows or tables.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"tables must be [D={rows}, W] int64/int32, got {tuple(tables.shape)} {tables.dtype}"
        )
    if lens.shape != (rows,) or lens.dtype not in INDEX_DTYPES:
        raise ValueError(f"lens must be [D={rows}] int64/int32, got {tuple(lens.shape)} {lens.dtype}")
    _check_device(q, k_pool=k_pool, v_pool=v_pool, out=out, tables=tables, lens=lens)
    if rows == 0:
        return
    kv_heads, bs = k_pool.shape[2], k_pool.shape[1]
    max_keys = tables.shape[1] * bs
    block_n = 16 if triton_interpreting() else 64
    if splits is None:
        splits = decode_splits(rows * kv_heads, max_keys, q.device)
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, splits), block_n) * block_n
    group = heads // kv_heads
    block_d = _block_d(d)
    if splits > 1:
        part = torch.empty(rows * heads * splits * block_d, dtype=torch.float32, device=q.device)
        stat = torch.empty(rows * heads * splits * 2, dtype=torch.float32, device=q.device)
    else:
        part = stat = out  # not read: the kernel writes out directly
    _decode_kernel[(rows, kv_heads, splits)](
        q, k_pool, v_pool, tables, lens, out, part, stat,
        scale * LOG2E, window or 0, d, keys_per_split,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        BS=bs, SPLITS=splits, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(rows, heads)](
            part, stat, out, d, out.stride(0), out.stride(1), SPLITS=splits, BLOCK_D=block_d
        )


def varlen_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    chunks: torch.Tensor,
    max_chunk_len: int,
    scale: float,
    window: int | None,
    out: torch.Tensor,
) -> None:
    """Causal attention of every prefill chunk of a step in one launch (formula in the module docstring).

    q: [T, heads, d] (the step's flat rows); k_pool, v_pool: [blocks, bs, kv_heads, d], the chunks' own K/V
    already written; tables: [P, W] int64/int32, chunk c's blocks; chunks: [P, 3] int64/int32, per chunk
    (first row in q, length, context: tokens of its sequence cached before it); max_chunk_len: the longest
    chunk's length (sizes the grid); out: [T, heads, d], the chunks' rows written, the others untouched."""
    _, heads, d = _check_common(q, k_pool, v_pool, out, "prefill")
    if chunks.dim() != 2 or chunks.shape[1] != 3 or chunks.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"chunks must be [P, 3] int64/int32 (start, length, context), got {tuple(chunks.shape)} "
            f"{chunks.dtype}"
        )
    n = chunks.shape[0]
    if tables.dim() != 2 or tables.shape[0] != n or tables.dtype not in INDEX_DTYPES:
        raise ValueError(f"tables must be [P={n}, W] int64/int32, got {tuple(tables.shape)} {tables.dtype}")
    if not chunks.is_contiguous():
        raise ValueError("chunks must be contiguous")
    _check_device(q, k_pool=k_pool, v_pool=v_pool, out=out, tables=tables, chunks=chunks)
    if n == 0 or max_chunk_len <= 0:
        return
    kv_heads, bs = k_pool.shape[2], k_pool.shape[1]
    block_m, block_n = (16, 16) if triton_interpreting() else (64, 64)
    _prefill_kernel[(n, triton.cdiv(max_chunk_len, block_m), heads)](
        q, k_pool, v_pool, tables, chunks, out,
        scale * LOG2E, window or 0, d,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(d), BS=bs,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
    )  # fmt: skip


def decode_splits(programs: int, max_keys: int, device: torch.device) -> int:
    """Pieces to cut each row's keys into: enough programs to fill the device's multiprocessors twice, with
    at least 256 keys a piece; a power of two (shapes only, so one captured graph serves every step)."""
    want = -(-2 * _multiprocessors(device) // max(programs, 1))
    most = max(1, max_keys // 256)
    splits = 1
    while splits * 2 <= min(want, most):
        splits *= 2
    return splits


def _check_common(q, k_pool, v_pool, out, what: str) -> tuple[int, int, int]:
    if q.dim() != 3 or k_pool.dim() != 4:
        raise ValueError(
            f"{what} attention: q must be [T, heads, d] and the pools [blocks, bs, kv_heads, d], got "
            f"{tuple(q.shape)} and {tuple(k_pool.shape)}"
        )
    rows, heads, d = q.shape
    _, bs, kv_heads, d_pool = k_pool.shape
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool {tuple(v_pool.shape)} must have k_pool's shape {tuple(k_pool.shape)}")
    if d_pool != d or heads % kv_heads:
        raise ValueError(
            f"q has {heads} heads of {d} but the pools hold {kv_heads} kv heads of {d_pool}: the head sizes "
            "must match and heads must be a multiple of kv_heads"
        )
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"the pools' block size must be a power of two, got {bs}")
    if q.dtype not in FLOAT_DTYPES or not (q.dtype == k_pool.dtype == v_pool.dtype == out.dtype):
        raise ValueError(
            f"q, the pools and out must share one of float32, float16, bfloat16, got {q.dtype}, "
            f"{k_pool.dtype}, {v_pool.dtype}, {out.dtype}"
        )
    if out.shape != q.shape:
        raise ValueError(f"out must be q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("out", out)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
    return rows, heads, d


def _check_device(q: torch.Tensor, **tensors: torch.Tensor) -> None:
    check_triton_device(q.device)
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter's tl.dot multiplies bf16 tiles as their raw bits (triton 3.9): fp32 there (exact)
    return dtype == torch.bfloat16 and triton_interpreting()


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
