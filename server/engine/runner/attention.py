"""Attention over the paged KV cache: torch ops (SDPA underneath), and C kernels for decode rows and prefills.

A step's tokens are one flat batch: first the *decode* rows (one new token each, whatever their context), then
the *prefill* chunks (several new tokens of one sequence, possibly after context already in the cache). The
decode rows share one call that reads their blocks in place (hotlora's C kernel, fp32 on CPU:
`kernels/paged_attention.py`) or else one SDPA over their gathered blocks; each prefill chunk runs its own
(causal within the chunk, lower-right aligned after its context): hotlora's C kernel where it applies (fp32
on CPU, head size a multiple of 64, no autograd: `kernels/prefill_attention.py`; in bf16 arithmetic for
chunks of WIDEN_ROWS tokens and more when the runner multiplies those in bf16), SDPA otherwise.
Sliding-window layers mask keys more than `window - 1` positions behind the query, as transformers'
sliding-window mask does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hotlora.kernels import paged_attention as native_decode
from hotlora.kernels import prefill_attention as native_prefill
from hotlora.kernels.narrow_linear import WIDEN_ROWS


@dataclass(frozen=True)
class PrefillSpan:
    start: int  # first token of the chunk in the flat batch
    length: int  # new tokens
    context: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # [blocks covering context + length] int64


@dataclass(frozen=True)
class AttentionMetadata:
    num_decode: int  # the first num_decode tokens are decode rows
    decode_tables: torch.Tensor  # [D, max_blocks] int64, padded with the null block
    decode_lens: torch.Tensor  # [D] int64: tokens each decode row attends to (its new token included)
    prefills: tuple[PrefillSpan, ...]
    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V is written in the pool
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, L] bool, built once per step for full attention


def decode_mask(lens: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[D, 1, 1, length] bool: key j is visible to row d (whose query sits at lens[d] - 1)."""
    cols = torch.arange(length, device=lens.device)[None, :]
    mask = cols < lens[:, None]
    if window is not None:
        mask &= cols > lens[:, None] - 1 - window
    return mask[:, None, None, :]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    long_in_bf16: bool = False,
) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] (already written to the pools);
    pools: [blocks, bs, kv_heads, d]. Returns [T, heads * d]. `long_in_bf16`: prefill chunks of WIDEN_ROWS
    tokens and more in bf16 arithmetic where the C kernel has it (Runner.long_products_in_bf16)."""
    num_tokens, heads, d = q.shape
    out = q.new_empty(num_tokens, heads, d)
    nd = meta.num_decode
    if nd and native_decode.usable(q, k_pool):
        native_decode.decode(
            q[:nd], k_pool, v_pool, meta.decode_tables, meta.decode_lens, scale, window, out[:nd]
        )
    elif nd:
        tables = meta.decode_tables
        bs = k_pool.shape[1]
        length = tables.shape[1] * bs
        kd = k_pool[tables].view(nd, length, *k_pool.shape[2:]).transpose(1, 2)  # [D, kvh, L, d]
        vd = v_pool[tables].view(nd, length, *v_pool.shape[2:]).transpose(1, 2)
        mask = (
            meta.decode_mask
            if window is None and meta.decode_mask is not None
            else decode_mask(meta.decode_lens, length, window)
        )
        o = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=kd.shape[1] != heads
        )
        out[:nd] = o.squeeze(2)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        if span.context == 0:
            ks, vs = k[rows], v[rows]
        else:  # the chunk attends to its cached context too: gather it (the chunk's own K/V included)
            total = span.context + span.length
            ks, vs = _gather(k_pool, span.block_table, total), _gather(v_pool, span.block_table, total)
        o = _prefill(q[rows], ks, vs, span.context, scale, window, long_in_bf16)
        if span.length == num_tokens:  # the step's only chunk: its output is the step's
            return o.reshape(num_tokens, heads * d)
        out[rows] = o
    return out.view(num_tokens, heads * d)


def _prefill(
    q, k, v, context: int, scale: float, window: int | None, long_in_bf16: bool = False
) -> torch.Tensor:
    """q: [L, heads, d] at positions context ..; k, v: [context + L, kv_heads, d] -> [L, heads, d]."""
    if native_prefill.usable(q, k, v):
        bf16 = long_in_bf16 and q.shape[0] >= WIDEN_ROWS and native_prefill.bf16_available()
        return native_prefill.attend(q, k, v, context, scale, window, bf16)
    qs, ks, vs = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, L, d]
    gqa = ks.shape[0] != qs.shape[0]
    # 4-D inputs: with 3-D ones torch's CPU SDPA falls back to its math path (the scores materialised,
    # 4-10x slower at 512 tokens); 4-D ones take the flash kernel, as transformers' calls do
    qs, ks, vs = qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0)
    if window is None and context == 0:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = _chunk_mask(context, q.shape[0], window, q.device)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def _gather(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    bs = pool.shape[1]
    blocks = table[: -(-length // bs)]
    return pool[blocks].view(-1, *pool.shape[2:])[:length]  # [length, kvh, d]


def _chunk_mask(context: int, length: int, window: int | None, device) -> torch.Tensor:
    """[length, context + length] bool: query i (at position context + i) sees keys j <= context + i."""
    qpos = torch.arange(context, context + length, device=device)[:, None]
    kpos = torch.arange(context + length, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """Training and scoring without a cache: right-padded [B, L] sequences, causal within each sequence.
    q: [B, L, heads, d], k, v: [B, L, kv_heads, d] -> [B, L, heads * d]. Padding rows attend to their own
    sequence's real tokens (their outputs are ignored by the caller)."""
    b, length, heads, d = q.shape
    pos = torch.arange(length, device=q.device)
    mask = pos[None, :] <= pos[:, None]  # [L, L] causal
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    mask = mask[None] & (pos[None, None, :] < lengths[:, None, None])  # keys past the length: hidden
    mask |= ~mask.any(-1, keepdim=True)  # a row with no visible key (padding) sees all: no NaN
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=k.shape[2] != heads,
    )
    return o.transpose(1, 2).reshape(b, length, heads * d)
