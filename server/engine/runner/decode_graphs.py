"""Decode steps with static shapes, replayed as CUDA graphs.

A decode-only step (every sequence adds one token) is padded to a *bucket*: the batch to the next of
:data:`BATCH_BUCKETS` and the block-table width to the next power of two. Each (batch, width) bucket owns
its input buffers, so the forward pass reads the same addresses every time and launches the same kernels:
on CUDA it is captured once as a graph and then replayed after the inputs are copied in (no Python per
layer, no launch overhead). Padding rows are harmless by construction: token 0 at position 0, a table of the
null block, one visible key (finite, because every block is zeroed before use), their K/V written to the
null block's first slot, slot -1 (no adapter); their outputs are dropped.

Nothing in the step reads a device value back to the host: attention reads the length buffer on the
device (the Triton kernels on CUDA; the torch path builds its mask from it), and the LoRA update uses the
backend's graph plan (``LoraBackend.graph_plan``: slot ids and ranks read by the kernels at run time, so
installing an adapter into a slot needs no new capture or compile). The plan travels in the step's input
(``StepInput.lora``), not in the runtime's shared context. The only synchronisation left in a decode step
is the engine reading the sampled tokens (tests/server/test_cuda_step.py).

Without a graph (CPU tests), the same static path runs eagerly: it is how the tests check that padding and
bucketing change no output. The CPU serves decode steps on the dynamic path (hotlora's C kernels, one call
a layer's op): compiling that path with torch.compile measured 0.78-1.00x the eager engine and was removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import AttentionMetadata, AttentionPath, decode_mask
from .kv_cache import NULL_BLOCK
from .model import StepInput

log = logging.getLogger("hotlora.runner")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(n: int) -> int | None:
    """The smallest bucket holding n rows, or None when n is past the largest."""
    return next((b for b in BATCH_BUCKETS if b >= n), None)


def width_bucket(blocks: int, max_width: int) -> int:
    """Block-table width: the next power of two, at most the longest table a sequence can have."""
    return min(1 << max(blocks - 1, 0).bit_length(), max_width)


@dataclass
class _Bucket:
    ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    tables: torch.Tensor  # [B, W] int64
    lens: torch.Tensor  # [B] int64
    mapping: torch.Tensor  # [B] int64
    slots: torch.Tensor  # [B] int64, -1 = base model
    staging: torch.Tensor  # [5 + W, B] int64 on the host (pinned on CUDA): filled, then copied in once
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # [B, H] the captured forward's output (overwritten by each replay)


class StaticDecode:
    """Decode steps of a Runner through per-bucket static buffers: CUDA graphs when ``capture``, else eager.

    ``lora_plan(slots_buffer)``: the LoRA plan of a step from its bucket's slot buffer (the adapter
    runtime's ``graph_plan``), passed to the forward in its StepInput; None = no adapters."""

    def __init__(
        self,
        runner,
        capture: bool,
        lora_plan: Callable[[torch.Tensor], object] | None = None,
    ):
        if capture and runner.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device (capture=False runs the static path eagerly)")
        self.runner = runner
        self.capture = capture
        self.lora_plan = lora_plan
        self.block_size = runner.kv_config.block_size
        self.max_width = -(-runner.spec.max_positions // self.block_size)
        self.max_batch = BATCH_BUCKETS[-1]
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for all graphs

    def fits(self, rows: int) -> bool:
        """Whether a decode step of `rows` takes this path."""
        return batch_bucket(rows) is not None

    def run(
        self,
        ids: list[int],
        positions: list[int],
        tables: list[list[int]],
        mapping: list[int],
        slots: list[int],
    ) -> torch.Tensor:
        """Final-norm hidden states [n, H] of n decode rows (K/V written to the pool, as Runner.forward)."""
        n = len(ids)
        bsz = batch_bucket(n)
        if bsz is None:
            raise ValueError(f"{n} decode rows is past the largest bucket ({self.max_batch})")
        width = width_bucket(max(len(t) for t in tables), self.max_width)
        b = self._bucket(bsz, width)
        self._fill(b, ids, positions, tables, mapping, slots)
        if b.graph is not None:
            b.graph.replay()
            return b.out[:n]
        return self._forward(b.ids, b.positions, b.tables, b.lens, b.mapping, b.slots)[:n]

    def _fill(self, b: _Bucket, ids, positions, tables, mapping, slots) -> None:
        n = len(ids)
        st = b.staging
        st.zero_()  # padding rows: token 0 at position 0, null-block tables ...
        st[3].fill_(1)  # ... one visible key ...
        st[4].fill_(NULL_BLOCK * self.block_size)  # ... K/V written to the null block ...
        st[2].fill_(-1)  # ... no adapter
        if n:
            st[0, :n] = torch.tensor(ids, dtype=torch.int64)
            st[1, :n] = torch.tensor(positions, dtype=torch.int64)
            st[2, :n] = torch.tensor(slots, dtype=torch.int64)
            st[3, :n] = st[1, :n] + 1
            st[4, :n] = torch.tensor(mapping, dtype=torch.int64)
        for i, t in enumerate(tables):
            st[5 : 5 + len(t), i] = torch.tensor(t, dtype=torch.int64)
        nb = self.capture  # pinned staging: the copies are asynchronous
        b.ids.copy_(st[0], non_blocking=nb)
        b.positions.copy_(st[1], non_blocking=nb)
        b.slots.copy_(st[2], non_blocking=nb)
        b.lens.copy_(st[3], non_blocking=nb)
        b.mapping.copy_(st[4], non_blocking=nb)
        b.tables.copy_(st[5:].T, non_blocking=nb)

    # ---- buckets ------------------------------------------------------------------------------------------
    def _bucket(self, bsz: int, width: int) -> _Bucket:
        b = self._buckets.get((bsz, width))
        if b is None:
            b = self._buckets[(bsz, width)] = self._make(bsz, width)
        return b

    def _make(self, bsz: int, width: int) -> _Bucket:
        dev = self.runner.device

        def buf(*shape):
            return torch.zeros(*shape, dtype=torch.int64, device=dev)

        staging = torch.zeros(5 + width, bsz, dtype=torch.int64)
        if self.capture:
            staging = staging.pin_memory()
        b = _Bucket(buf(bsz), buf(bsz), buf(bsz, width), buf(bsz), buf(bsz), buf(bsz), staging)
        b.lens.fill_(1)
        b.mapping.fill_(NULL_BLOCK * self.block_size)
        b.slots.fill_(-1)
        if self.capture:
            self._capture(b)
            log.info("captured the decode step for %d rows x %d blocks as a CUDA graph", bsz, width)
        return b

    def _forward(self, ids, positions, tables, lens, mapping, slots) -> torch.Tensor:
        """The step from a bucket's buffers (what the CUDA graph captures)."""
        length = tables.shape[1] * self.block_size
        meta = AttentionMetadata(
            num_decode=ids.shape[0],
            decode_tables=tables,
            decode_lens=lens,
            prefills=(),
            slot_mapping=mapping,
            # the torch path's mask (the Triton kernels and the C kernel read the lengths themselves)
            decode_mask=None
            if self.runner.attention_path is AttentionPath.TRITON
            else decode_mask(lens, length, None),
        )
        lora = self.lora_plan(slots) if self.lora_plan is not None else None
        return self.runner(StepInput(ids, positions, meta, lora))

    def _capture(self, b: _Bucket) -> None:
        args = (b.ids, b.positions, b.tables, b.lens, b.mapping, b.slots)
        # warm up on a side stream first (lazy initialisation, autotuning), as torch.cuda.graphs advises
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            b.out = self._forward(*args)
        b.graph = graph
