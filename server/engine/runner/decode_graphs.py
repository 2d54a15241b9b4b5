"""Decode steps with static shapes: replayed as CUDA graphs on GPU, compiled with torch.compile on CPU.

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

On CPU, ``compile=True`` (``--torch-compile``) runs the step through ``torch.compile`` (inductor): hotlora's
C kernels are custom ops there (``torch.ops.hotlora.*``), so one graph covers the whole forward. One graph
serves every bucket of two rows or more and every width (both marked dynamic), one more the single row.
Compiling takes a minute or more on a 2-core machine, so it happens on a background thread
(:meth:`StaticDecode.start_warmup`): the server is ready at once and decodes eagerly until the graphs are
in; a step that would need a new compile afterwards runs eagerly instead. It is off by default: on the
2-core CPU it measured 0.89-1.00x the eager engine's throughput (benchmarks/engine.py --compile,
docs/engine.md).

Without either (CPU tests), the same static path runs eagerly: it is how the tests check that padding and
bucketing change no output.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hotlora.kernels import decoder_ops, lora_decode, paged_attention
from hotlora.kernels.omp_teams import release_thread_team

from .attention import AttentionMetadata, AttentionPath, decode_mask
from .kv_cache import NULL_BLOCK
from .model import StepInput

log = logging.getLogger("hotlora.runner")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def compile_refusal(runner_kind: str, runner) -> str | None:
    """Why the decode step cannot be compiled here (None: it can): the graph is hotlora's runner in fp32 on
    CPU with its C kernels, which torch.compile sees as custom ops (anything else would break the graph)."""
    if runner_kind != "runner":
        return "this model family serves through transformers, not hotlora's runner"
    if runner.device.type != "cpu":
        return f"it is the CPU path (the model is on {runner.device}; CUDA replays CUDA graphs)"
    if runner.dtype != torch.float32:
        return f"it needs float32 compute (the model computes in {runner.dtype})"
    if not (decoder_ops.available() and paged_attention.available() and lora_decode.available()):
        return "hotlora's C kernels could not be built on this machine (see the warning above)"
    return None


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


# torch.compile: the widths and batches a warm-up traces. One graph takes every batch of 2 or more rows and
# every width of 2 or more blocks (dynamo specialises sizes 0 and 1, so a width is padded to at least 2);
# the single row has its own graph.
WARMUP_BUCKETS = ((1, 2), (2, 2))
# inductor: its own kernels here are small elementwise ones (residual adds, SiLU times up), cheaper on one
# thread than waking a team for each; no size asserts between the ops (hundreds a step)
COMPILE_OPTIONS = {"cpp.threads": 1, "size_asserts": False, "alignment_asserts": False}


class StaticDecode:
    """Decode steps of a Runner through per-bucket static buffers: CUDA graphs when ``capture``, torch.compile
    when ``compile`` (CPU), else eager.

    ``lora_plan(slots_buffer)``: the LoRA plan of a step from its bucket's slot buffer (the adapter
    runtime's ``graph_plan``), passed to the forward in its StepInput; None = no adapters."""

    def __init__(
        self,
        runner,
        capture: bool,
        lora_plan: Callable[[torch.Tensor], object] | None = None,
        compile: bool = False,
    ):
        if compile and (capture or runner.device.type != "cpu"):
            raise ValueError("torch.compile of the decode step is the CPU path (CUDA replays CUDA graphs)")
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
        self.compile = compile
        # compiled: the traced step, and whether its graphs are in (set by the warm-up thread)
        self._compiled = (
            torch.compile(self._forward, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)
            if compile
            else None
        )
        self.compiled_ready = threading.Event()
        self._warmup_thread: threading.Thread | None = None
        self.warmup_error: BaseException | None = None
        self._fallbacks = 0  # steps that ran eagerly because their shapes would need a new compile

    def fits(self, rows: int) -> bool:
        """Whether a decode step of `rows` takes this path now (compiled: once the warm-up is done)."""
        if self.compile and not self.compiled_ready.is_set():
            return False
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
        if self.compile:
            width = max(width, 2)
        b = self._bucket(bsz, width)
        self._fill(b, ids, positions, tables, mapping, slots)
        if b.graph is not None:
            b.graph.replay()
            return b.out[:n]
        if self.compile:
            return self._run_compiled(b)[:n]
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

    # ---- torch.compile ----------------------------------------------------------------------------------
    def start_warmup(self) -> threading.Thread:
        """Compile the step on a background thread (WARMUP_BUCKETS, all rows padding: their K/V go to the null
        block, as any padding row's); steps run eagerly until it is done. Returns the thread."""
        if not self.compile:
            raise ValueError("start_warmup: this StaticDecode does not compile")
        thread = threading.Thread(target=self._warmup, name="hotlora-compile", daemon=True)
        thread.start()
        self._warmup_thread = thread
        return thread

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the warm-up started by start_warmup; whether the compiled graphs are in."""
        if self._warmup_thread is not None:
            self._warmup_thread.join(timeout)
        return self.compiled_ready.is_set()

    def _warmup(self) -> None:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():  # the engine's mode: a graph traced outside it would not be reused
                for bsz, width in WARMUP_BUCKETS:
                    b = self._bucket(bsz, width)
                    self._fill(b, [], [], [], [], [])
                    torch._dynamo.mark_dynamic(b.tables, 1)
                    if bsz > 1:
                        for t in (b.ids, b.positions, b.tables, b.lens, b.mapping, b.slots):
                            torch._dynamo.mark_dynamic(t, 0)
                    self._compiled(b.ids, b.positions, b.tables, b.lens, b.mapping, b.slots)
        except Exception as exc:  # noqa: BLE001 -- any compile failure leaves the eager path serving
            self.warmup_error = exc
            log.warning("torch.compile of the decode step failed; decoding stays eager: %s", exc)
            return
        finally:
            release_thread_team()  # this thread's OpenMP workers would slow the engine's parallel regions
        log.info("compiled the decode step with torch.compile in %.0f s", time.perf_counter() - t0)
        self.compiled_ready.set()

    def _run_compiled(self, b: _Bucket) -> torch.Tensor:
        args = (b.ids, b.positions, b.tables, b.lens, b.mapping, b.slots)
        try:
            # a step whose shapes no graph covers runs eagerly rather than compile on the engine thread
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._compiled(*args)
        except RuntimeError as exc:
            if "Detected recompile" not in str(exc):  # dynamo's message under this stance
                raise
            self._fallbacks += 1
            if self._fallbacks == 1:
                log.warning("a decode step of %d rows x %d blocks ran eagerly: %s", *b.tables.shape, exc)
            return self._forward(*args)

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
        """The step from a bucket's buffers (what the CUDA graph captures and torch.compile traces)."""
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
