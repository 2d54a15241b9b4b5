"""What the scheduler tracks per admitted request: a *sequence* (a generation request, or one text of a
pooling request) with its tokens, its device adapter slot, its KV blocks and how many of its tokens already
have K/V in the cache (`num_computed`); a pooling request's group of sequences; and the bookkeeping of the
generation sequences admitted (running, preempted, expired, retired)."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

import torch

from hotlora.adapters.head_features import HeadFeatures
from hotlora.server.engine.detokenizer import IncrementalDetokenizer
from hotlora.server.engine.endings import Endings, expiry
from hotlora.server.engine.requests import FinishReason, GenerationRequest, PoolingRequest
from hotlora.server.engine.runner.kv_cache import BlockManager, SequenceKV

log = logging.getLogger("hotlora.engine")


@dataclass(eq=False)
class Seq:
    """A generation request, or one text of a pooling request, as the scheduler tracks it. `slot` is the
    adapter's device slot, acquired at admission and held until the request is released: the one place
    it is kept."""

    req: GenerationRequest | PoolingRequest
    tokens: list[int]
    slot: int
    kv: SequenceKV
    num_computed: int = 0
    admitted_order: int = 0
    # generation
    detok: IncrementalDetokenizer | None = None
    gen: torch.Generator | None = None
    # pooling
    part: int = 0  # which text of the request
    features: HeadFeatures = HeadFeatures()  # the hidden state it is pooled from, and how
    pooled_sum: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def is_generation(self) -> bool:
        return isinstance(self.req, GenerationRequest)


@dataclass(eq=False)
class PoolingGroup:
    """A pooling request in flight: its texts' sequences and their results."""

    req: PoolingRequest
    results: list[torch.Tensor | None] = field(default_factory=list)
    remaining: int = 0


def cache_key(req: GenerationRequest | PoolingRequest) -> tuple:
    """The prefix cache's key: no KV block is shared across tenants or adapter versions."""
    adapter = getattr(req.adapter, "key", None) if req.adapter is not None else None
    return (req.tenant, adapter)


class GenerationSeqs:
    """The admitted generation sequences: `running` (prefilling or decoding) in admission order, and
    `resume`, the preempted ones, re-admitted first (recomputing what they held)."""

    def __init__(self, blocks: BlockManager, runtime, endings: Endings):
        self.blocks = blocks
        self.runtime = runtime
        self.endings = endings
        self.running: list[Seq] = []
        self.resume: collections.deque[Seq] = collections.deque()
        self.preemptions = 0

    def add(self, seq: Seq, order: int) -> Seq:
        seq.admitted_order = order
        self.running.append(seq)
        return seq

    def readmit(self, order: int) -> Seq:
        """The first preempted sequence back in the batch, with what the prefix cache still holds of it."""
        seq = self.resume.popleft()
        seq.kv = self.blocks.open(cache_key(seq.req), seq.tokens)
        seq.num_computed = seq.kv.num_cached
        return self.add(seq, order)

    def newest(self) -> Seq:
        return max(self.running, key=lambda s: s.admitted_order)

    def preempt(self, seq: Seq) -> None:
        """Give `seq`'s blocks back (registered ones stay in the prefix cache); it waits to be re-admitted."""
        self.blocks.close(seq.kv)
        seq.num_computed = 0
        self.running.remove(seq)
        self.resume.appendleft(seq)
        self.preemptions += 1
        log.info(
            "KV cache full: preempted request %s (%d tokens); it is recomputed when re-admitted",
            seq.req.seq,
            len(seq.tokens),
        )

    def expire(self, now: float) -> None:
        """End the cancelled and the expired (they leave at the next `retire`)."""
        for seq in list(self.running) + list(self.resume):
            reason = None if seq.req.done else expiry(seq.req, now)
            if reason is not None:
                self.endings.end(seq.req, reason)

    def retire(self) -> None:
        """Finished requests leave: their blocks and adapter slots go back."""
        for seq in [s for s in self.running if s.req.done]:
            self.blocks.close(seq.kv)
            self.running.remove(seq)
            self.runtime.release(seq.req.adapter)
        for seq in [s for s in self.resume if s.req.done]:
            self.resume.remove(seq)
            self.runtime.release(seq.req.adapter)

    def fail_all(self, why: str) -> None:
        for seq in list(self.running) + list(self.resume):
            if not seq.req.done:
                self.endings.end(seq.req, FinishReason.ERROR, RuntimeError(why))
            self.blocks.close(seq.kv)
            self.runtime.release(seq.req.adapter)
        self.running.clear()
        self.resume.clear()
