"""Embed and Classify requests in the engine: every text is a sequence, read in chunks like a prompt and
pooled when its last chunk is done; the request's result is ready when all its texts are (for Classify,
after the adapter's head).

Embed pools the mean of the last hidden state. Classify pools what the adapter's head was trained on
(`HeadFeatures`: last token or mean, of the last layer or of an earlier one): a step whose texts read
earlier layers asks the runner for those layers' states in the same forward (`taps`), so texts of heads
with different features share one batch and one pass."""

from __future__ import annotations

import torch

from hotlora.adapters.head_features import LAST_LAYER, HeadFeatures
from hotlora.server.engine.endings import Endings, expiry
from hotlora.server.engine.requests import FinishReason, PoolingRequest
from hotlora.server.engine.runner.kv_cache import BlockManager
from hotlora.server.engine.sequences import PoolingGroup, Seq, cache_key


class PoolingWork:
    def __init__(self, blocks: BlockManager, runtime, endings: Endings, hidden_size: int):
        self.blocks = blocks
        self.runtime = runtime
        self.endings = endings
        self.hidden_size = hidden_size
        self.seqs: list[Seq] = []  # texts still being read
        self._groups: dict[int, PoolingGroup] = {}  # by request seq

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def admit(self, req: PoolingRequest, slot: int, next_order) -> list[Seq]:
        """The request's texts as sequences; no prefix reuse (mean pooling needs every token's state)."""
        group = PoolingGroup(req, [None] * len(req.inputs), len(req.inputs))
        self._groups[req.seq] = group
        key = cache_key(req)
        # the adapter is resident from admission on: its head's features are known now
        features = HeadFeatures("mean") if req.mode == "mean" else self.runtime.head_features(req.adapter)
        seqs = [
            Seq(req, list(ids), slot, self.blocks.open(key, (), lookup=False), part=i, features=features)
            for i, ids in enumerate(req.inputs)
        ]
        for seq in seqs:
            seq.admitted_order = next_order()
        self.seqs.extend(seqs)
        if not seqs:
            self._finish(group)
        return seqs

    @staticmethod
    def taps(seqs: list[Seq]) -> dict[int, torch.Tensor | None]:
        """The earlier layers a step's pooling texts read: the runner fills them in the same forward."""
        return {s.features.layer: None for s in seqs if s.features.layer != LAST_LAYER}

    def chunk(self, seq: Seq, rows: slice, hidden: torch.Tensor, taps: dict[int, torch.Tensor]) -> None:
        """A chunk of `seq` was computed: its tokens are `rows` of the step's last hidden states `hidden`
        and of the tapped layers' states `taps`."""
        layer, mean = seq.features.layer, seq.features.pooling == "mean"
        states = (hidden if layer == LAST_LAYER else taps[layer])[rows]
        if mean:
            part = states.float().sum(0)
            seq.pooled_sum = part if seq.pooled_sum is None else seq.pooled_sum + part
        if seq.pending:
            return
        seq.pooled = seq.pooled_sum / len(seq.tokens) if mean else states[-1]
        group = self._groups.get(seq.req.seq)
        self.blocks.close(seq.kv)
        self.seqs.remove(seq)
        if group is None:
            return
        group.results[seq.part] = seq.pooled
        group.remaining -= 1
        if group.remaining == 0:
            self._finish(group)

    def expire(self, now: float) -> None:
        for seq in list(self.seqs):
            reason = expiry(seq.req, now)
            if reason is not None:
                self._drop(seq.req, reason)

    def fail_all(self, why: str) -> None:
        for group in list(self._groups.values()):
            self.endings.end(group.req, FinishReason.ERROR, RuntimeError(why))
            self.runtime.release(group.req.adapter)
        self._groups.clear()
        for seq in self.seqs:
            self.blocks.close(seq.kv)
        self.seqs = []

    def _finish(self, group: PoolingGroup) -> None:
        req = group.req
        self._groups.pop(req.seq, None)
        try:
            if not group.results:
                out = torch.zeros(0, self.hidden_size)
            elif req.mode == "mean":
                out = torch.stack(group.results).float().cpu()
            else:
                out = self.runtime.classify(req.adapter, torch.stack(group.results)).float().cpu()
            req.future.set_result(out)
        except Exception as exc:  # a broken head fails its request, not the batch
            req.future.set_exception(exc)
        finally:
            self.runtime.release(req.adapter)

    def _drop(self, req: PoolingRequest, reason: FinishReason) -> None:
        for seq in [s for s in self.seqs if s.req is req]:
            self.blocks.close(seq.kv)
            self.seqs.remove(seq)
        if self._groups.pop(req.seq, None) is not None:
            self.endings.end(req, reason)
            self.runtime.release(req.adapter)
