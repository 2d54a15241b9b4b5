"""The CPU path of the batched multi-adapter LoRA update: torch ops picked by batch shape.

``y[t, off:off+H_out] += scale[s] · (x[t] · A[s, :r_s]ᵀ) · B[s, :, :r_s]ᵀ`` for s = s(t) != -1.

Three strategies, measured on a 2-core Xeon at SmolLM2-135M shapes (benchmarks/kernels.py):

* ``single``: every token uses one slot, two plain GEMMs on rank-sliced views, no indexing at all.
* ``segments``: one GEMM pair per segment (tokens of one slot). Segments that are contiguous token ranges
  (prefill: a request's tokens sit together) are views of x and y, updated in place with ``addmm_``;
  otherwise x is gathered once into slot order and the result scattered back once.
  Cost is ~10 µs of dispatch per segment plus the GEMMs, so it wins when segments are long.
* ``dense``: decode batches whose used slots nearly fill a slot range and share one rank: the bank
  slices are used as views in two bmm calls, so each adapter's weights are read once and never copied
  (2x faster than ``bmm`` at 32 distinct rank-16 adapters, where the weight reads dominate).
* ``bmm``: tokens grouped by rank; per group, gather each token's A and B (rank-sliced, so a rank-4
  adapter moves rank-4 bytes) and run two batched GEMVs. A constant number of ops whatever the number of
  adapters, so it wins for decode batches of many distinct adapters (one-token segments).

:func:`choose_cpu_strategy` picks by the number of segments and their mean length; the thresholds come
from the benchmark. Per-slot ranks are honoured by slicing (``A[s, :r_s]``), never by paying R_max.
16-bit inputs run the GEMMs in their dtype (oneDNN accumulates in fp32).

* ``native`` (kernels/lora_decode.py, fp32 where hotlora's C kernels run): replaces ``dense`` and ``bmm``,
  ``single`` up to 32 tokens and ``segments`` whose mean length is at most 64 tokens. Two C calls read each
  run of tokens on one slot from the banks in place at that slot's own rank, so mixed ranks cost their own
  bytes, not a gather per rank group (32 rows of ranks 4-64: 3.3x -> 1.2x the base linears, one thread),
  and a prefill of many adapters pays no dispatch per segment (32 prompts x 14 tokens: 2.8x faster).

Decode with 32 distinct rank-16 adapters reads more bytes than the base linears (32 adapters' A and B
against one weight matrix), and decode is memory bound: those reads at the machine's bandwidth are its floor.
"""

from __future__ import annotations

import torch

from . import lora_decode
from .cpu_plan import DenseLayout, SegmentPlan, SlotsPlan
from .rows_ahead import Ahead, StepSlots

# Mean tokens per segment at or above which one GEMM pair per segment beats gather + bmm.
SEGMENT_MIN_MEAN_LEN = 4
# Up to this many segments the per-segment loop is cheap enough whatever their length.
SEGMENT_MAX_SHORT = 2


def choose_cpu_strategy(batch: SegmentPlan) -> str:
    """'single', 'segments', 'dense' or 'bmm' for this batch (see the module docstring)."""
    if batch.single_slot >= 0:
        return "single"
    groups = batch.num_segments
    if groups <= SEGMENT_MAX_SHORT or batch.num_lora_tokens >= SEGMENT_MIN_MEAN_LEN * groups:
        return "segments"
    if batch.dense is not None:
        return "dense"
    return "bmm"


def add_lora_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    batch: SegmentPlan,
    out_offset: int = 0,
    strategy: str | None = None,
) -> None:
    """``y[t, off:off+H_out] += scales[s] · (x[t] · A[s, :r_s]ᵀ) · B[s, :, :r_s]ᵀ``, s = s(t) != -1.

    y: [T, H_total] (in place, may be a strided view), x: [T, H_in], lora_a: [S, R_max, H_in],
    lora_b: [S, H_out, R_max], scales: [S] float32; x, y, banks of one dtype (fp32/fp16/bf16).
    strategy: force 'single' / 'segments' / 'dense' / 'bmm' / 'native' (benchmarks, tests); None picks by
    shape, and takes 'native' (the C kernel, kernels/lora_decode.py) for 'dense' and 'bmm' where it runs.
    """
    if not batch.has_lora:
        return
    ys = y[:, out_offset : out_offset + lora_b.shape[1]]
    strategy = strategy or pick_cpu_strategy(batch, y, x, lora_a, lora_b)
    if strategy == "native" and not lora_decode.usable(y, x, lora_a, lora_b):
        strategy = choose_cpu_strategy(batch)  # 16-bit or strided tensors: the torch strategy it replaces
    if strategy in ("dense", "bmm") and lora_a.dtype != x.dtype:  # bf16 banks where the C kernel cannot run
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if strategy == "native":
        u = lora_decode.shrink(x, batch.token_slots, lora_a, 1, batch.slot_ranks)
        lora_decode.expand(ys, u, 0, batch.token_slots, lora_b, batch.slot_ranks, scales)
    elif strategy == "single" and batch.single_slot >= 0:
        seg = batch.segments[0]
        _segment_update(ys, x, lora_a, lora_b, float(scales[seg.slot]), seg.slot, seg.rank)
    elif strategy in ("segments", "single"):
        _add_by_segments(ys, x, lora_a, lora_b, scales, batch)
    elif strategy == "bmm" or (strategy == "dense" and batch.dense is None):
        _add_by_bmm(ys, x, lora_a, lora_b, scales, batch)
    elif strategy == "dense":
        _add_dense(ys, x, lora_a, lora_b, scales, batch)
    else:
        raise ValueError(
            f"unknown CPU strategy {strategy!r}; use 'single', 'segments', 'dense', 'bmm' or 'native'"
        )


# Where the C kernel beats torch's GEMMs (benchmarks/kernels.py, 2 threads, SmolLM2 shapes): it reads each
# run of tokens on one slot once and keeps those rows in cache for the run, at ~75 GFLOPS; torch pays ~10 µs
# of dispatch per op and per segment but runs long segments at GEMM speed. Measured crossovers: one adapter,
# 32-48 tokens; many adapters, 64-96 tokens per segment (32 prompts of 14 tokens: 2.8x faster in C).
NATIVE_SINGLE_MAX_TOKENS = 32
NATIVE_MAX_MEAN_SEGMENT = 64


def pick_cpu_strategy(batch: SegmentPlan, y, x, lora_a, lora_b) -> str:
    """:func:`choose_cpu_strategy`, with the C kernel ('native') instead of the bmm strategies (decode
    batches of many slots), of 'single' for a few tokens, and of 'segments' when they are short (prefill
    of many adapters), where it can run on these tensors."""
    strategy = choose_cpu_strategy(batch)
    if native_wanted(batch, strategy, x.shape[0]) and lora_decode.usable(y, x, lora_a, lora_b):
        return "native"
    return strategy


def native_wanted(batch: SegmentPlan, strategy: str, tokens: int) -> bool:
    """Whether the C kernel beats `strategy` (choose_cpu_strategy's pick) for this batch of `tokens` rows."""
    if strategy == "single":
        return tokens <= NATIVE_SINGLE_MAX_TOKENS
    if strategy == "segments":
        return batch.num_lora_tokens <= NATIVE_MAX_MEAN_SEGMENT * batch.num_segments
    return strategy in ("dense", "bmm")


class NativePackedSite:
    """CpuBackend.bind_packed: one site's packed update through the C kernel, with what depends only on the
    site's banks worked out once (lora_decode.PackedSite) and the path chosen once per plan (_shared_route:
    every site of a step sees the same plan). A call the kernel does not take as it is -- another plan type,
    a plan whose shape calls for a torch strategy, tensors of another dtype, shape or layout -- goes through
    `general` (the backend's add_lora_packed, with its checks and its errors). Not for torch.compile to
    trace: it would guard on the plan _shared_route holds (LoraSite calls the backend directly while
    compiling)."""

    def __init__(self, general, lora_a, lora_bs, scales, out_offsets) -> None:
        self._general = general
        self._site = lora_decode.PackedSite(lora_a, lora_bs, scales, out_offsets)
        self._num_slots, self._r_max = lora_a.shape[0], lora_a.shape[1] // len(lora_bs)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, batch) -> None:
        route, site = _shared_route(batch, self._num_slots, self._r_max), self._site
        if (
            route is None
            or x.dtype != torch.float32
            or y.dtype != torch.float32
            or not (x.is_cpu and y.is_cpu)
            or x.dim() != 2
            or y.dim() != 2
            or x.shape[0] != route[2]
            or y.shape[0] != route[2]
            or x.shape[1] != site.in_features
            or y.shape[1] < site.out_features
            or x.stride(1) != 1
            or y.stride(1) != 1
        ):
            self._general(y, x, batch)
            return
        site(y, x, route[0], route[1])

    def ahead(self, x: torch.Tensor, batch) -> Ahead | None:
        """What this update will read for `batch`, for the base product of x before it to prefetch
        (kernels/rows_ahead.py); None when the kernel will not run it, or for a single row (the base
        product then streams its own weights: nothing to overlap)."""
        route = _shared_route(batch, self._num_slots, self._r_max)
        if route is None or route[2] < 2 or x.dim() != 2 or x.shape[0] != route[2]:
            return None
        return Ahead(self._site.banks_ahead, _step_slots(route))


# The last plan's route, for the bank shape it was worked out for: every site of a step sees the same plan
# and banks of one slot count and rank, so the route is worked out once a step, not at each of ~120 sites.
# Holding the plan keeps its id from being reused by another.
_last_route: tuple = (None, 0, 0, None)
# The slots the last route reads, worked out on a weight kernel's first ask (none ask on most paths).
_last_slots: tuple = (None, None)

Route = tuple[torch.Tensor, torch.Tensor, int]


def _shared_route(batch, num_slots: int, r_max: int) -> Route | None:
    global _last_route
    plan, slot_count, rank, route = _last_route
    if plan is batch and slot_count == num_slots and rank == r_max:
        return route
    route = _route_of(batch, num_slots, r_max)
    _last_route = (batch, num_slots, r_max, route)  # one tuple: a reader on another thread sees old or new
    return route


def _step_slots(route: Route) -> StepSlots:
    global _last_slots
    seen, slots = _last_slots
    if seen is not route:
        slots = StepSlots(route[0], route[1])
        _last_slots = (route, slots)  # one tuple, as _last_route
    return slots


def _route_of(batch, num_slots: int, r_max: int) -> Route | None:
    """(slots, ranks, tokens) for the kernel, int64 and contiguous, or None: the plan is not one the kernel
    takes as it is for banks of `num_slots` slots of rank `r_max` (the general path then runs it)."""
    if not isinstance(batch, (SegmentPlan, SlotsPlan)) or not batch.has_lora:
        return None
    if batch.slot_ranks.shape[0] != num_slots or batch.max_rank > r_max:
        return None  # the general path says what is wrong
    if isinstance(batch, SegmentPlan) and not native_wanted(
        batch, choose_cpu_strategy(batch), batch.num_tokens
    ):
        return None
    slots, ranks = batch.token_slots, batch.slot_ranks
    if slots.dim() != 1 or slots.shape[0] != batch.num_tokens or not (slots.is_cpu and ranks.is_cpu):
        return None
    return slots.to(torch.int64).contiguous(), ranks.to(torch.int64).contiguous(), batch.num_tokens


def _segment_update(
    ys: torch.Tensor,
    xs: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    slot: int,
    rank: int,
) -> None:
    # ys: [n, H_out] view, xs: [n, H_in]; bf16 banks (--adapter-dtype bfloat16) widen one slot's rows
    v = torch.mm(xs, lora_a[slot, :rank].to(xs.dtype).T)  # [n, r]
    ys.addmm_(v, lora_b[slot, :, :rank].to(xs.dtype).T, alpha=scale)


def _add_by_segments(
    ys: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    batch: SegmentPlan,
) -> None:
    scale_of = scales.tolist()
    if batch.segments_are_slices:
        for seg in batch.segments:
            rows = slice(seg.token_start, seg.token_start + seg.length)
            _segment_update(ys[rows], x[rows], lora_a, lora_b, scale_of[seg.slot], seg.slot, seg.rank)
        return
    xs = x.index_select(0, batch.token_order)  # [T_lora, H_in], slot order
    delta = torch.zeros(xs.shape[0], ys.shape[1], dtype=ys.dtype, device=ys.device)
    for seg in batch.segments:
        rows = slice(seg.start, seg.start + seg.length)
        _segment_update(delta[rows], xs[rows], lora_a, lora_b, scale_of[seg.slot], seg.slot, seg.rank)
    scatter_add_rows(ys, batch.token_order, delta, batch.token_rank)


def _add_by_bmm(
    ys: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    batch: SegmentPlan,
) -> None:
    for group in batch.rank_groups:
        r = group.rank
        xg = x.index_select(0, group.tokens).unsqueeze(1)  # [n, 1, H_in]
        a = lora_a[:, :r].index_select(0, group.slots)  # [n, r, H_in]
        v = torch.bmm(xg, a.transpose(1, 2))  # [n, 1, r]
        v.mul_(scales.index_select(0, group.slots).to(v.dtype).view(-1, 1, 1))
        b = lora_b[:, :, :r].index_select(0, group.slots)  # [n, H_out, r]
        delta = torch.bmm(v, b.transpose(1, 2)).squeeze(1)  # [n, H_out]
        scatter_add_rows(ys, group.tokens, delta, batch.token_rank if len(batch.rank_groups) == 1 else None)


def _add_dense(
    ys: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    batch: SegmentPlan,
) -> None:
    # Bank slices are views: each used adapter's weights are read once, never copied (decode is bound
    # by those reads). x is scattered into a [span, rows, H_in] layout, zero where no token sits.
    layout, r = batch.dense, batch.max_rank
    lo, span, rows = layout.lo, layout.span, layout.rows
    a, b = lora_a[lo : lo + span, :r].transpose(1, 2), lora_b[lo : lo + span, :, :r].transpose(1, 2)
    if layout.tokens is not None:  # decode: one token per slot, few ops (dispatch cost matters here)
        xs = x if layout.in_order else x.index_select(0, layout.tokens)
        v = torch.bmm(xs.unsqueeze(1), a)  # [span, 1, r]
        v.mul_(scales[lo : lo + span].to(v.dtype).view(-1, 1, 1))
        _add_dense_rows(ys, torch.bmm(v, b).squeeze(1), layout)  # [span, H_out]
        return
    xf = x.new_zeros(span * rows, x.shape[1])
    xf.index_copy_(0, layout.index, x.index_select(0, batch.token_order))
    v = torch.bmm(xf.view(span, rows, -1), a)  # [span, rows, r]
    v.mul_(scales[lo : lo + span].to(v.dtype).view(-1, 1, 1))
    d = torch.bmm(v, b)  # [span, rows, H_out]
    scatter_add_rows(
        ys, batch.token_order, d.view(span * rows, -1).index_select(0, layout.index), batch.token_rank
    )


def _add_dense_rows(ys: torch.Tensor, d: torch.Tensor, layout: DenseLayout) -> None:
    # d: [span, H_out], row j the update of the one token of slot lo + j (layout.tokens[j])
    if layout.in_order:
        ys.add_(d)
    elif layout.slot_of is not None:
        ys.add_(d.index_select(0, layout.slot_of))
    else:
        scatter_add_rows(ys, layout.tokens, d)


def scatter_add_rows(
    ys: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, rank: torch.Tensor | None = None
) -> None:
    """``ys[rows[i]] += src[i]`` for distinct rows. ``index_add_`` is several times slower than this inside
    the model's forward on CPU, so: a gather + add when src covers every row in ``rows`` order given by
    ``rank`` (``rank[t]`` = position of row t in ``rows``), else an index_copy into zeros + add."""
    if rank is not None:
        ys.add_(src.index_select(0, rank))
        return
    full = src.new_zeros(ys.shape[0], src.shape[1])
    full.index_copy_(0, rows, src)
    ys.add_(full)


def add_lora_packed_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: tuple[torch.Tensor, ...],
    scales: torch.Tensor,
    batch: SegmentPlan,
    out_offsets: tuple[int, ...],
) -> bool:
    """A fused projection's update with one shrink over the packed bank, where that is possible without
    reading past the slots' ranks: the C kernel (which honours per-slot ranks), or every used slot at the
    bank's full rank R with a single adapter or a decode batch on the dense layout. Returns False (nothing
    done) otherwise: the caller then runs one add_lora per slice. See LoraBackend.add_lora_packed for the
    shapes."""
    n = len(lora_bs)
    r_max = lora_a.shape[1] // n
    strategy = pick_cpu_strategy(batch, y, x, lora_a, lora_bs[0])
    if strategy == "native":
        if lora_decode.one_layout(lora_bs):
            # one shrink over the packed bank, one expand per slice, in one C call; per-slot ranks honoured
            lora_decode.packed(
                y, x, batch.token_slots, lora_a, lora_bs, batch.slot_ranks, scales, out_offsets
            )
            return True
        strategy = choose_cpu_strategy(batch)
    if batch.max_rank != r_max or any(g.rank != r_max for g in batch.rank_groups):
        return False
    if strategy == "single":
        s = batch.single_slot
        v = torch.mm(x, lora_a[s].to(x.dtype).T)  # [T, n·R]: q, k and v (or gate and up) in one GEMM
        for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
            ys = y[:, off : off + b.shape[1]]
            ys.addmm_(v[:, i * r_max : (i + 1) * r_max], b[s].to(x.dtype).T, alpha=float(scales[i, s]))
        return True
    if lora_a.dtype != x.dtype:  # bf16 banks where the C kernel cannot run: the per-slice path widens
        return False
    layout = batch.dense
    if strategy != "dense" or layout.tokens is None:
        return False
    lo, span = layout.lo, layout.span
    xs = x if layout.in_order else x.index_select(0, layout.tokens)
    v = torch.bmm(xs.unsqueeze(1), lora_a[lo : lo + span].transpose(1, 2))  # [span, 1, n·R]
    for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
        vi = v[:, :, i * r_max : (i + 1) * r_max] * scales[i, lo : lo + span].to(v.dtype).view(-1, 1, 1)
        d = torch.bmm(vi, b[lo : lo + span].transpose(1, 2)).squeeze(1)  # [span, H_i]
        _add_dense_rows(y[:, off : off + b.shape[1]], d, layout)
    return True
