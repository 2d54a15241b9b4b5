"""One engine step's flat batch: every decoding sequence's pending token first, then each prefill chunk,
with the positions, adapter slots and KV pool positions of every token; and the runner's input built from
it on the dynamic-shape path (the CUDA-graph path takes the lists as they are)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotlora.server.engine.runner.attention import AttentionMetadata, PrefillSpan, decode_mask
from hotlora.server.engine.runner.kv_cache import NULL_BLOCK
from hotlora.server.engine.runner.model import StepInput
from hotlora.server.engine.sequences import Seq


@dataclass
class StepBatch:
    decode: list[Seq]
    prefill: list[tuple[Seq, int]]  # (sequence, chunk length)
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # one adapter slot per token
    mapping: list[int] = field(default_factory=list)  # one KV pool position per token
    spans: list[PrefillSpan] = field(default_factory=list)  # one per prefill chunk

    @classmethod
    def build(cls, decode: list[Seq], prefill: list[tuple[Seq, int]], block_size: int, device) -> StepBatch:
        bs = block_size
        b = cls(decode, prefill)
        for seq in decode:
            p = seq.num_computed
            b.ids.append(seq.tokens[p])
            b.pos.append(p)
            b.slots.append(seq.slot)
            b.mapping.append(seq.kv.blocks[p // bs] * bs + p % bs)
        for seq, n in prefill:
            start, p0 = len(b.ids), seq.num_computed
            b.ids.extend(seq.tokens[p0 : p0 + n])
            b.pos.extend(range(p0, p0 + n))
            b.slots.extend([seq.slot] * n)
            blocks = seq.kv.blocks
            b.mapping.extend(blocks[p // bs] * bs + p % bs for p in range(p0, p0 + n))
            b.spans.append(PrefillSpan(start, n, p0, torch.tensor(blocks, dtype=torch.int64, device=device)))
        return b

    def step_input(self, block_size: int, device) -> StepInput:
        """The runner's tensors for this batch (the dynamic-shape path)."""
        decode = self.decode
        if decode:
            width = max(len(s.kv.blocks) for s in decode)
            tables = torch.full((len(decode), width), NULL_BLOCK, dtype=torch.int64)
            for i, seq in enumerate(decode):
                tables[i, : len(seq.kv.blocks)] = torch.tensor(seq.kv.blocks, dtype=torch.int64)
            lens = torch.tensor([s.num_computed + 1 for s in decode], dtype=torch.int64)
            tables, lens = tables.to(device), lens.to(device)
            mask = decode_mask(lens, width * block_size, None)
        else:
            tables = torch.zeros((0, 1), dtype=torch.int64, device=device)
            lens = torch.zeros(0, dtype=torch.int64, device=device)
            mask = None
        meta = AttentionMetadata(
            num_decode=len(decode),
            decode_tables=tables,
            decode_lens=lens,
            prefills=tuple(self.spans),
            slot_mapping=torch.tensor(self.mapping, dtype=torch.int64, device=device),
            decode_mask=mask,
        )
        return StepInput(
            torch.tensor(self.ids, dtype=torch.int64, device=device),
            torch.tensor(self.pos, dtype=torch.int64, device=device),
            meta,
        )
