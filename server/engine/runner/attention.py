"""Attention over the paged KV cache, decided once per runner (`attention_path`): on CUDA hotlora's Triton
kernels, on a CPU its C kernels where they apply and the torch reference elsewhere.

A step's tokens are one flat batch: first the *decode* rows (one new token each, whatever their context), then
the *prefill* chunks (several new tokens of one sequence, possibly after context already in the cache).

- CUDA (`kernels/triton_attention.py`): one launch for the decode rows and one for every prefill chunk of
  the step (varlen, causal within each chunk after its cached context), both reading K and V in place
  through the block tables.
- CPU: the decode rows share one C call that reads their blocks in place (fp32: `kernels/paged_attention.py`)
  and each prefill chunk runs its own (fp32, head size a multiple of 64, no autograd:
  `kernels/prefill_attention.py`; in bf16 arithmetic for chunks of WIDEN_ROWS tokens and more when the
  runner multiplies those in bf16); elsewhere the torch reference (`kernels/attention_reference.py`:
  gather the blocks, mask, SDPA), which is also what the kernels are tested against.

Sliding-window layers mask keys more than `window - 1` positions behind the query, as transformers'
sliding-window mask does.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hotlora.kernels import attention_reference as reference
from hotlora.kernels import paged_attention as native_decode
from hotlora.kernels import prefill_attention as native_prefill
from hotlora.kernels.backend import triton_available
from hotlora.kernels.narrow_linear import WIDEN_ROWS
from hotlora.kernels.native import ops

from .kv_cache import NULL_BLOCK

decode_mask = reference.decode_mask  # the torch path's mask, built once a step by its callers


class AttentionPath(enum.Enum):
    TRITON = "triton"  # CUDA (or the Triton interpreter in tests)
    CPU = "cpu"  # hotlora's C kernels where they apply, the torch reference elsewhere


def attention_path(device: torch.device) -> AttentionPath:
    """The kernels a runner on `device` attends with."""
    return AttentionPath.TRITON if device.type == "cuda" and triton_available() else AttentionPath.CPU


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
    # every prefill chunk at once, for the varlen kernel: [P, W] int64 tables padded with the null block
    # and [P, 3] int64 (start, length, context); built from `prefills` on first need when not given
    prefill_tables: torch.Tensor | None = None
    prefill_chunks: torch.Tensor | None = None

    @functools.cached_property
    def prefill_layout(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tables [P, W], chunks [P, 3], the longest chunk's length) of the step's prefill chunks."""
        longest = max((s.length for s in self.prefills), default=0)
        if self.prefill_tables is not None and self.prefill_chunks is not None:
            return self.prefill_tables, self.prefill_chunks, longest
        device = self.slot_mapping.device
        width = max((s.block_table.shape[0] for s in self.prefills), default=1)
        tables = torch.full((len(self.prefills), width), NULL_BLOCK, dtype=torch.int64, device=device)
        for i, s in enumerate(self.prefills):
            tables[i, : s.block_table.shape[0]] = s.block_table
        chunks = torch.tensor([(s.start, s.length, s.context) for s in self.prefills], dtype=torch.int64)
        return tables, chunks.reshape(-1, 3).to(device), longest


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
    path: AttentionPath = AttentionPath.CPU,
) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] (already written to the pools);
    pools: [blocks, bs, kv_heads, d]. Returns [T, heads * d]. `long_in_bf16`: prefill chunks of WIDEN_ROWS
    tokens and more in bf16 arithmetic where the C kernel has it (Runner.long_products_in_bf16)."""
    if path is AttentionPath.TRITON:
        return _triton_attention(q, k_pool, v_pool, meta, scale, window)
    num_tokens, heads, d = q.shape
    out = q.new_empty(num_tokens, heads, d)
    nd = meta.num_decode
    if nd and native_decode.usable(q, k_pool):
        ops().paged_decode_attention(
            q[:nd], k_pool, v_pool, meta.decode_tables, meta.decode_lens, scale, window or 0, out[:nd]
        )
    elif nd:
        mask = meta.decode_mask if window is None else None
        out[:nd] = reference.paged_decode(
            q[:nd], k_pool, v_pool, meta.decode_tables, meta.decode_lens, scale, window, mask
        )
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        if span.context == 0:
            ks, vs = k[rows], v[rows]
        else:  # the chunk attends to its cached context too: gather it (the chunk's own K/V included)
            total = span.context + span.length
            ks = reference.gather(k_pool, span.block_table, total)
            vs = reference.gather(v_pool, span.block_table, total)
        o = _prefill(q[rows], ks, vs, span.context, scale, window, long_in_bf16)
        if span.length == num_tokens:  # the step's only chunk: its output is the step's
            return o.reshape(num_tokens, heads * d)
        out[rows] = o
    return out.view(num_tokens, heads * d)


def _triton_attention(q, k_pool, v_pool, meta: AttentionMetadata, scale: float, window) -> torch.Tensor:
    from hotlora.kernels import triton_attention  # triton is imported only where it runs

    num_tokens, heads, d = q.shape
    out = q.new_empty(num_tokens, heads, d)
    nd = meta.num_decode
    if nd:
        triton_attention.paged_decode(
            q[:nd], k_pool, v_pool, meta.decode_tables, meta.decode_lens, scale, window, out[:nd]
        )
    if meta.prefills:
        tables, chunks, longest = meta.prefill_layout
        triton_attention.varlen_prefill(q, k_pool, v_pool, tables, chunks, longest, scale, window, out)
    return out.view(num_tokens, heads * d)


def _prefill(
    q, k, v, context: int, scale: float, window: int | None, long_in_bf16: bool = False
) -> torch.Tensor:
    """q: [L, heads, d] at positions context ..; k, v: [context + L, kv_heads, d] -> [L, heads, d]."""
    if native_prefill.usable(q, k, v):
        bf16 = long_in_bf16 and q.shape[0] >= WIDEN_ROWS and native_prefill.bf16_available()
        return ops().prefill_attention(q, k, v, context, scale, window or 0, bf16)
    return reference.prefill(q, k, v, context, scale, window)


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
