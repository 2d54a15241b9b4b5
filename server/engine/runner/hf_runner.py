"""The transformers path: a causal LM the runner does not cover, served on the same engine and KV cache.

Each step's rows (decode rows and prefill chunks) become one right-padded [rows, longest chunk] forward of the
transformers model. A `Cache` object writes the real tokens' K/V into the paged pool and hands every layer the
rows' K/V gathered from their block tables; a 4D mask (lower-right causal per row, padding hidden) is passed
as is. LoRA goes through the model's wrapped nn.Linear layers (`inject_multi_lora`), with the step's token
slots moved to the padded layout. Slower than the runner (transformers' Python per layer, a gather per
layer), but any `model.layers`-style causal LM works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .kv_cache import KVCacheConfig, KVPool
from .model import StepInput

log = logging.getLogger("hotlora.runner")


@dataclass(frozen=True)
class FallbackSpec:
    """The few shapes the engine and the cache need (the runner's ModelSpec has more)."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    sliding_window: int | None


class HFRunner(nn.Module):
    def __init__(self, model, kv_bytes: int, block_size: int = 16):
        super().__init__()
        self.model = model
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        c = model.config
        heads = c.num_attention_heads
        types = set(getattr(c, "layer_types", None) or ())
        window = getattr(c, "sliding_window", None) if types <= {"sliding_attention"} else None
        if types - {"full_attention", "sliding_attention"} or len(types) > 1:
            log.warning("transformers path: layers of different attention types all attend fully here")
        self.spec = FallbackSpec(
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            max_positions=int(getattr(c, "max_position_embeddings", 1 << 20)),
            sliding_window=window,
        )
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        s = self.spec
        bytes_per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * param.element_size()
        self.kv_config = KVCacheConfig.for_bytes(kv_bytes, bytes_per_token, block_size=block_size)
        self.pool = KVPool(s.num_layers, self.kv_config, s.num_kv_heads, s.head_dim, self.dtype, self.device)
        self.lora_ctx = None  # the LoraContext of the wrapped layers, when adapters are served
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()

    def forward(self, step: StepInput, taps: dict | None = None) -> torch.Tensor:
        """As the runner's forward (`taps`: layer k -> transformers' `hidden_states[k]` of the tokens)."""
        meta = step.attention
        rows = _rows(step)  # (first token in the step, length, context, block table) per row
        num_rows, width = len(rows), max(r[1] for r in rows)
        bs = self.kv_config.block_size
        keys = max(r[2] + r[1] for r in rows)
        nb = -(-keys // bs)
        dev = self.device
        ids = torch.zeros(num_rows, width, dtype=torch.int64, device=dev)
        pos = torch.zeros(num_rows, width, dtype=torch.int64, device=dev)
        tables = torch.zeros(num_rows, nb, dtype=torch.int64, device=dev)
        flat = torch.empty(step.token_ids.shape[0], dtype=torch.int64, device=dev)  # step token -> padded
        mask = torch.zeros(num_rows, 1, width, nb * bs, dtype=torch.bool, device=dev)
        kpos = torch.arange(nb * bs, device=dev)
        for r, (start, length, context, table) in enumerate(rows):
            ids[r, :length] = step.token_ids[start : start + length]
            pos[r, :length] = step.positions[start : start + length]
            t = table[:nb]
            tables[r, : t.shape[0]] = t
            flat[start : start + length] = torch.arange(r * width, r * width + length, device=dev)
            qpos = torch.arange(context, context + length, device=dev)[:, None]
            visible = kpos[None, :] <= qpos
            if self.spec.sliding_window is not None:
                visible &= kpos[None, :] > qpos - self.spec.sliding_window
            mask[r, 0, :length] = visible
            mask[r, 0, length:, 0] = True  # padding queries see one key: no NaN, ignored
        cache = _PagedCache(self.pool, meta.slot_mapping, flat, tables, nb * bs, self.spec.num_layers)
        ctx = self.lora_ctx
        saved = ctx.batch if ctx is not None else None
        if saved is not None:  # the step's slots, moved to the padded token order
            padded = torch.full((num_rows * width,), -1, dtype=torch.int64, device=dev)
            padded[flat] = saved.token_slots
            ctx.batch = ctx.backend.plan(padded, saved.slot_ranks)
        try:
            out = self._decoder(
                input_ids=ids,
                position_ids=pos,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                cache_position=pos[0],
                output_hidden_states=bool(taps),
            )
        finally:
            if ctx is not None:
                ctx.batch = saved
        for k in taps or {}:
            taps[k] = out.hidden_states[k].reshape(num_rows * width, -1)[flat]
        return out.last_hidden_state.reshape(num_rows * width, -1)[flat]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden)

    def get_decoder(self) -> nn.Module:
        return self._decoder

    def get_output_embeddings(self) -> nn.Module:
        return self._lm_head


def _rows(step: StepInput) -> list[tuple[int, int, int, torch.Tensor]]:
    meta = step.attention
    rows = []
    for d in range(meta.num_decode):
        length = int(meta.decode_lens[d])
        rows.append((d, 1, length - 1, meta.decode_tables[d]))
    for span in meta.prefills:
        rows.append((span.start, span.length, span.context, span.block_table))
    return rows


class _PagedLayer(DynamicLayer):
    """One layer's view of the pool for one forward: writes the real tokens, returns gathered K/V."""

    def __init__(self, cache: _PagedCache, index: int):
        super().__init__()
        self.cache = cache
        self.index = index

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.cache
        b, heads, q, d = key_states.shape
        k = key_states.transpose(1, 2).reshape(b * q, heads, d)[c.flat]
        v = value_states.transpose(1, 2).reshape(b * q, heads, d)[c.flat]
        c.pool.write(self.index, c.slot_mapping, k, v)
        keys = c.pool.k[self.index][c.tables].view(b, c.length, heads, d).transpose(1, 2)
        values = c.pool.v[self.index][c.tables].view(b, c.length, heads, d).transpose(1, 2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_mask_sizes(self, cache_position, *args, **kwargs) -> tuple[int, int]:
        return self.cache.length, 0


class _PagedCache(Cache):
    def __init__(self, pool: KVPool, slot_mapping, flat, tables, length: int, num_layers: int):
        self.pool, self.slot_mapping, self.flat = pool, slot_mapping, flat
        self.tables, self.length = tables, length
        super().__init__(layers=[_PagedLayer(self, i) for i in range(num_layers)])
