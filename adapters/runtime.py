"""The engine's view of adapters: slots for rows, the LoRA plan for each forward,
and classification heads. Implements hotlora.server.engine.scheduler.AdapterRuntime.

`SlotContents` is what each device slot holds; the cache installs into it and the runtime reads it, so both
are built from it with nothing set afterwards: contents, then the cache (installing into the contents), then
the runtime (over both). `sites` are the places an adapter is installed into: the runner's LoraSites (fused
projections) or, on the transformers path, the wrapped MultiLoraLinear layers; both take
`install(slot, weights)` / `clear(slot)`."""

from __future__ import annotations

import torch

from hotlora.adapters.cache import AdapterCache
from hotlora.adapters.errors import FailedPrecondition
from hotlora.adapters.head_features import HeadFeatures
from hotlora.adapters.lora_layers import LoraContext, graph_batch, set_batch


class SlotContents:
    """The weights, rank and classification head in each device slot (written by the cache's installer
    and clearer on the engine thread)."""

    def __init__(self, sites: list, num_slots: int, device, dtype):
        self.sites = list(sites)
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.ranks = torch.zeros(num_slots, dtype=torch.long)
        # the same ranks on the compute device, read by the kernels of a captured decode step at run time
        self.ranks_device = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.heads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.features: dict[int, HeadFeatures] = {}  # what each slot's head reads

    def install(self, slot: int, weights) -> None:
        for site in self.sites:
            site.install(slot, weights)
        self.ranks[slot] = weights.rank
        self.ranks_device[slot] = weights.rank
        if weights.head_weight is not None:
            bias = None if weights.head_bias is None else weights.head_bias.to(self.device, self.dtype)
            self.heads[slot] = (weights.head_weight.to(self.device, self.dtype), bias)
            self.features[slot] = weights.head_features
        else:
            self.heads.pop(slot, None)
            self.features.pop(slot, None)

    def clear(self, slot: int) -> None:
        for site in self.sites:
            site.clear(slot)
        self.ranks[slot] = 0
        self.ranks_device[slot] = 0
        self.heads.pop(slot, None)
        self.features.pop(slot, None)


class MultiLoraRuntime:
    def __init__(self, ctx: LoraContext, contents: SlotContents, cache: AdapterCache, max_rank: int = 0):
        self.ctx = ctx
        self.contents = contents
        self.cache = cache
        self.device = contents.device
        self.max_rank = max_rank
        # the contents' tensors (updated in place by install/clear), read by the batch plans below
        self.slot_ranks = contents.ranks
        self.slot_ranks_device = contents.ranks_device

    # ---- AdapterRuntime -------------------------------------------------------------
    def try_acquire(self, handle) -> int | None:
        if handle is None:
            return -1
        return self.cache.try_acquire(handle.key, handle.record)

    def release(self, handle) -> None:
        if handle is not None:
            self.cache.release(handle.key)

    def begin_forward(self, token_slots: list[int]) -> None:
        set_batch(self.ctx, token_slots, self.slot_ranks, self.device)

    def graph_plan(self, token_slots: torch.Tensor):
        """The LoRA plan of a static decode step (runner.decode_graphs), for its StepInput: built from the
        slot buffer without reading it, so a captured graph stays valid whatever the buffer and the slots
        hold later."""
        return graph_batch(self.ctx, token_slots, self.slot_ranks_device, self.max_rank)

    def end_forward(self) -> None:
        self.ctx.batch = None

    def head_features(self, handle) -> HeadFeatures:
        """What the head of an acquired (resident) adapter reads; the default for one without a head,
        whose Classify then fails in `classify`."""
        slot = None if handle is None else self.cache.slot_of(handle.key)
        return self.contents.features.get(slot, HeadFeatures()) if slot is not None else HeadFeatures()

    def classify(self, handle, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: [n, hidden] the head's features (`head_features`) -> [n, num_labels] probabilities."""
        slot = None if handle is None else self.cache.slot_of(handle.key)
        head = self.contents.heads.get(slot) if slot is not None else None
        if head is None:
            raise FailedPrecondition("this adapter has no classification head")
        weight, bias = head
        logits = pooled.to(weight.dtype) @ weight.t()
        if bias is not None:
            logits = logits + bias
        return torch.softmax(logits.float(), dim=-1)

    def maintenance(self) -> None:
        self.cache.maintenance()
