"""One engine step's flat batch: every decoding sequence's pending token first, then each prefill chunk,
with the positions, adapter slots and KV pool positions of every token; and the runner's input built from
it on the dynamic-shape path (the CUDA-graph path takes the lists as they are): every index tensor of the
step laid out in one host buffer and sent to the device in one asynchronous copy (`device_io.to_device`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotlora.server.engine.device_io import to_device
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
    spans: list[PrefillSpan] = field(default_factory=list)  # one per prefill chunk (host block tables)

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
            b.spans.append(PrefillSpan(start, n, p0, torch.tensor(blocks, dtype=torch.int64)))
        return b

    def step_input(self, block_size: int, device) -> StepInput:
        """The runner's tensors for this batch (the dynamic-shape path), sent to `device` in one copy."""
        t, d, p = len(self.ids), len(self.decode), len(self.spans)
        dw = max((len(s.kv.blocks) for s in self.decode), default=1)
        pw = max((s.block_table.shape[0] for s in self.spans), default=1)
        sizes = (t, t, t, d * dw, d, p * pw, p * 3)
        host = torch.full((sum(sizes),), NULL_BLOCK, dtype=torch.int64)
        ids, pos, mapping, dtables, lens, ptables, chunks = host.split(sizes)
        ids.copy_(torch.tensor(self.ids, dtype=torch.int64))
        pos.copy_(torch.tensor(self.pos, dtype=torch.int64))
        mapping.copy_(torch.tensor(self.mapping, dtype=torch.int64))
        dtables = dtables.view(d, dw)
        for i, seq in enumerate(self.decode):
            dtables[i, : len(seq.kv.blocks)] = torch.tensor(seq.kv.blocks, dtype=torch.int64)
        lens.copy_(torch.tensor([s.num_computed + 1 for s in self.decode], dtype=torch.int64))
        ptables = ptables.view(p, pw)
        for i, span in enumerate(self.spans):
            ptables[i, : span.block_table.shape[0]] = span.block_table
        chunks.copy_(
            torch.tensor([(s.start, s.length, s.context) for s in self.spans], dtype=torch.int64).view(-1)
        )
        dev = to_device(host, device)
        ids, pos, mapping, dtables, lens, ptables, chunks = dev.split(sizes)
        dtables, ptables = dtables.view(d, dw), ptables.view(p, pw)
        spans = tuple(
            PrefillSpan(s.start, s.length, s.context, ptables[i, : s.block_table.shape[0]])
            for i, s in enumerate(self.spans)
        )
        meta = AttentionMetadata(
            num_decode=d,
            decode_tables=dtables,
            decode_lens=lens,
            prefills=spans,
            slot_mapping=mapping,
            # the mask serves the torch path only, a CPU's (CUDA attends with the Triton kernels)
            decode_mask=decode_mask(lens, dw * block_size, None) if d and dev.device.type == "cpu" else None,
            prefill_tables=ptables,
            prefill_chunks=chunks.view(p, 3),
        )
        return StepInput(ids, pos, meta)
