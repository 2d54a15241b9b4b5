"""A KV cache for a batch whose rows join and leave between decode steps.

Rows are left-padded to one common length: row r's real tokens sit in the last
`T - pad[r]` columns. Each layer keeps a preallocated buffer with a `[start, end)`
window so a decode step writes one column in place instead of concatenating the
whole cache (what transformers' DynamicCache does every step)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class WindowLayer(DynamicLayer):
    """One layer's K/V: `buf_k[:, :, start:end]` is live; writes go at `end`."""

    def __init__(self):
        super().__init__()
        self.buf_k: torch.Tensor | None = None
        self.buf_v: torch.Tensor | None = None
        self.start = 0
        self.end = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, extra: int) -> None:
        if self.buf_k is not None and self.end + extra <= self.buf_k.shape[2]:
            return
        live = self.end - self.start
        b, h, _, d = self.buf_k.shape
        cap = max(64, (live + extra) * 2)
        new_k = self.buf_k.new_empty(b, h, cap, d)
        new_v = self.buf_v.new_empty(b, h, cap, d)
        new_k[:, :, :live] = self.buf_k[:, :, self.start : self.end]
        new_v[:, :, :live] = self.buf_v[:, :, self.start : self.end]
        self.buf_k, self.buf_v, self.start, self.end = new_k, new_v, 0, live

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self.buf_k is None:
            b, h, _, d = key_states.shape
            cap = max(64, q * 2)
            self.buf_k = key_states.new_empty(b, h, cap, d)
            self.buf_v = value_states.new_empty(b, h, cap, d)
            self.start = self.end = 0
        else:
            self._reserve(q)
        self.buf_k[:, :, self.end : self.end + q] = key_states
        self.buf_v[:, :, self.end : self.end + q] = value_states
        self.end += q
        self.keys = self.buf_k[:, :, self.start : self.end]
        self.values = self.buf_v[:, :, self.start : self.end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buf_k[:, :, self.start : self.end], self.buf_v[:, :, self.start : self.end]

    def set_live(self, k: torch.Tensor, v: torch.Tensor, headroom: int = 32) -> None:
        b, h, t, d = k.shape
        self.buf_k = k.new_empty(b, h, t + headroom, d)
        self.buf_v = v.new_empty(b, h, t + headroom, d)
        self.buf_k[:, :, :t] = k
        self.buf_v[:, :, :t] = v
        self.start, self.end = 0, t
        self.keys, self.values = self.live()
        self.is_initialized = True
        self.dtype, self.device = k.dtype, k.device


class BatchKVCache(Cache):
    """The running batch's cache: one WindowLayer per decoder layer plus each row's left pad."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[WindowLayer() for _ in range(num_layers)])
        self.pad = torch.zeros(0, dtype=torch.long)  # [B] left padding columns per row

    @property
    def batch_size(self) -> int:
        return int(self.pad.shape[0])

    @property
    def length(self) -> int:
        return self.layers[0].get_seq_length() if self.layers[0].buf_k is not None else 0

    def attention_mask(self, new_tokens: int, device) -> torch.Tensor:
        """[B, T + new_tokens] of 0/1: 0 on each row's left padding."""
        cols = torch.arange(self.length + new_tokens)
        return (cols[None, :] >= self.pad[:, None]).to(device=device, dtype=torch.long)

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (in that order), then trim padding all rows share."""
        if not rows:
            for layer in self.layers:
                layer.buf_k = layer.buf_v = layer.keys = layer.values = None
                layer.start = layer.end = 0
            self.pad = torch.zeros(0, dtype=torch.long)
            return
        idx = torch.tensor(rows, dtype=torch.long)
        pad = self.pad[idx]
        trim = int(pad.min())
        for layer in self.layers:
            k, v = layer.live()
            dev_idx = idx.to(k.device)
            layer.set_live(k.index_select(0, dev_idx)[:, :, trim:], v.index_select(0, dev_idx)[:, :, trim:])
        self.pad = pad - trim

    def merge(self, other: BatchKVCache) -> None:
        """Append `other`'s rows, left-padding whichever side is shorter."""
        if self.batch_size == 0:
            self.layers, self.pad = other.layers, other.pad
            return
        t_self, t_other = self.length, other.length
        t = max(t_self, t_other)
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            k1, v1 = mine.live()
            k2, v2 = theirs.live()
            mine.set_live(_cat_left_padded(k1, k2, t), _cat_left_padded(v1, v2, t))
        self.pad = torch.cat([self.pad + (t - t_self), other.pad + (t - t_other)])


def _cat_left_padded(a: torch.Tensor, b: torch.Tensor, t: int) -> torch.Tensor:
    # a: [B1, H, T1, D], b: [B2, H, T2, D] -> [B1 + B2, H, t, D], zeros on the left.
    out = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], t, a.shape[3])
    out[: a.shape[0], :, t - a.shape[2] :] = a
    out[a.shape[0] :, :, t - b.shape[2] :] = b
    return out
