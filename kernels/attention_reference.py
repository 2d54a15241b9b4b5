"""Paged attention in plain torch: gather a sequence's blocks, mask, SDPA. The oracle the Triton kernels
(`triton_attention.py`) are tested against, and the runner's attention where no kernel applies (a CPU
without hotlora's C kernels, dtypes they do not take, training under autograd).

The arguments are the Triton launchers' own, so a test calls both the same way:

decode   ``out[r, h] = softmax_j(scale · q[r, h] · K_r[j]ᵀ) · V_r[j]`` over ``lo_r <= j < lens[r]``, where
         ``lo_r = max(0, lens[r] − window)`` (0 without a window) and ``K_r[j] = k_pool[tables[r, j // bs],
         j % bs, h // G]`` (G = heads / kv_heads query heads per kv head); a row of no keys gets zeros.
prefill  chunk c's token i (flat row ``chunks[c, 0] + i``, position ``p = chunks[c, 2] + i``) attends as
         decode does to the keys ``max(0, p − window + 1) <= j <= p`` of its own table ``tables[c]``
         (its cached context and the chunk's own keys, already written to the pool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_mask(lens: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[D, 1, 1, length] bool: key j is visible to row d (whose query sits at lens[d] - 1)."""
    cols = torch.arange(length, device=lens.device)[None, :]
    mask = cols < lens[:, None]
    if window is not None:
        mask &= cols > lens[:, None] - 1 - window
    return mask[:, None, None, :]


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [D, heads, d]; pools: [blocks, bs, kv_heads, d]; tables: [D, W] int; lens: [D] int (keys each row
    sees, its own included) -> [D, heads, d]. `mask`: decode_mask(lens, W * bs, window) when the caller
    has it already (built once a step)."""
    rows, heads, d = q.shape
    bs = k_pool.shape[1]
    length = tables.shape[1] * bs
    kd = k_pool[tables].view(rows, length, *k_pool.shape[2:]).transpose(1, 2)  # [D, kvh, L, d]
    vd = v_pool[tables].view(rows, length, *v_pool.shape[2:]).transpose(1, 2)
    if mask is None:
        mask = decode_mask(lens, length, window)
    # a row of no keys would softmax over nothing (NaN): let it see every key, then give it zeros
    empty = lens <= 0
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), kd, vd, attn_mask=mask | empty[:, None, None, None], scale=scale,
        enable_gqa=kd.shape[1] != heads,
    )  # fmt: skip
    return o.squeeze(2).masked_fill(empty[:, None, None], 0.0)


def prefill(q, k, v, context: int, scale: float, window: int | None) -> torch.Tensor:
    """One chunk: q: [L, heads, d] at positions context ..; k, v: [context + L, kv_heads, d]
    -> [L, heads, d]."""
    qs, ks, vs = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, L, d]
    gqa = ks.shape[0] != qs.shape[0]
    # 4-D inputs: with 3-D ones torch's CPU SDPA falls back to its math path (the scores materialised,
    # 4-10x slower at 512 tokens); 4-D ones take the flash kernel, as transformers' calls do
    qs, ks, vs = qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0)
    if window is None and context == 0:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = chunk_mask(context, q.shape[0], window, q.device)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def gather(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of a sequence: [length, kv_heads, d] (a copy)."""
    bs = pool.shape[1]
    blocks = table[: -(-length // bs)]
    return pool[blocks].reshape(-1, *pool.shape[2:])[:length]


def chunk_mask(context: int, length: int, window: int | None, device) -> torch.Tensor:
    """[length, context + length] bool: query i (at position context + i) sees keys j <= context + i."""
    qpos = torch.arange(context, context + length, device=device)[:, None]
    kpos = torch.arange(context + length, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def varlen_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    chunks: torch.Tensor,
    scale: float,
    window: int | None,
    out: torch.Tensor,
) -> None:
    """Every chunk of a step, one SDPA each. q: [T, heads, d]; pools: [blocks, bs, kv_heads, d];
    tables: [P, W] int; chunks: [P, 3] int (first row in q, length, context); out: [T, heads, d], the
    chunks' rows written."""
    for c, (start, length, context) in enumerate(chunks.tolist()):
        rows = slice(start, start + length)
        total = context + length
        ks, vs = gather(k_pool, tables[c], total), gather(v_pool, tables[c], total)
        out[rows] = prefill(q[rows], ks, vs, context, scale, window)
