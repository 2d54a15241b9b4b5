"""The CPU path of the batched multi-adapter LoRA update: the route its plan decided, applied.

``y[t, off:off+H_out] += scale[s] · (x[t] · A[s, :r_s]ᵀ) · B[s, :, :r_s]ᵀ`` for s = s(t) != -1.

`CpuBackend.plan` (kernels/cpu_plan.py) picks one route a step by the batch's shape; every site applies it:

* ``kernel`` (the C kernel `lora_packed`, fp32 activations on CPUs that run hotlora's kernels; banks fp32 or
  bf16, widened as read): each run of tokens on one slot reads its adapter from the banks in place, once, at
  that slot's own rank, so mixed ranks cost their own bytes (32 rows of ranks 4-64: 3.3x -> 1.2x the base
  linears, one thread), and a prefill of many adapters pays no dispatch per segment (32 prompts x 14 tokens:
  2.8x faster). It takes decode batches, one adapter up to 32 tokens, and segments of at most 64 tokens on
  average. A fused projection's update is one call: one shrink over the packed bank, one expand per slice.
* ``single``: every token uses one slot, two plain GEMMs on rank-sliced views, no indexing at all.
* ``segments``: one GEMM pair per segment (tokens of one slot). Segments that are contiguous token ranges
  (prefill: a request's tokens sit together) are views of x and y, updated in place with ``addmm_``;
  otherwise x is gathered once into slot order and the result scattered back once.
  Cost is ~10 µs of dispatch per segment plus the GEMMs, so it wins when segments are long.
* ``dense``: decode batches whose used slots nearly fill a slot range and share one rank: the bank
  slices are used as views in two bmm calls, so each adapter's weights are read once and never copied.
* ``bmm``: tokens grouped by rank; per group, gather each token's A and B (rank-sliced, so a rank-4
  adapter moves rank-4 bytes) and run two batched GEMVs.

The torch routes serve where the kernel cannot (16-bit activations, no AVX-512 or compiler) and long
segments, where torch's GEMMs are faster. Per-slot ranks are honoured by slicing (``A[s, :r_s]``), never by
paying R_max; 16-bit inputs run the GEMMs in their dtype (oneDNN accumulates in fp32).

Decode with 32 distinct rank-16 adapters reads more bytes than the base linears (32 adapters' A and B
against one weight matrix), and decode is memory bound: those reads at the machine's bandwidth are its floor.
"""

from __future__ import annotations

import torch

from .cpu_plan import CpuPlan, CpuRoute, DenseLayout, SegmentPlan
from .native import ops


def add_lora_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    plan: CpuPlan,
    out_offset: int = 0,
) -> None:
    """``y[t, off:off+H_out] += scales[s] · (x[t] · A[s, :r_s]ᵀ) · B[s, :, :r_s]ᵀ``, s = s(t) != -1, by the
    plan's route. y: [T, H_total] (in place, may be a strided view), x: [T, H_in], lora_a: [S, R_max, H_in],
    lora_b: [S, H_out, R_max], scales: [S] float32; x, y of one dtype, the banks of it or bf16 under fp32."""
    if not plan.has_lora:
        return
    if plan.route is CpuRoute.KERNEL:
        banks = ops().LoraBanks(
            lora_a.contiguous(), [_readable_b(lora_b)], scales.float().contiguous().view(1, -1), [out_offset]
        )
        _kernel(y, x, plan, banks)
        return
    ys = y[:, out_offset : out_offset + lora_b.shape[1]]
    batch, route = plan.segments, plan.route
    if route in (CpuRoute.DENSE, CpuRoute.BMM) and lora_a.dtype != x.dtype:  # bf16 banks under fp32
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if route is CpuRoute.SINGLE:
        seg = batch.segments[0]
        _segment_update(ys, x, lora_a, lora_b, float(scales[seg.slot]), seg.slot, seg.rank)
    elif route is CpuRoute.SEGMENTS:
        _add_by_segments(ys, x, lora_a, lora_b, scales, batch)
    elif route is CpuRoute.BMM:
        _add_by_bmm(ys, x, lora_a, lora_b, scales, batch)
    else:
        _add_dense(ys, x, lora_a, lora_b, scales, batch)


def _kernel(y: torch.Tensor, x: torch.Tensor, plan: CpuPlan, banks) -> None:
    """`lora_packed` on any y and x: the kernel reads rows of contiguous values, so other layouts (a test's
    column-major y) go through a copy."""
    if y.stride(-1) == 1:
        ops().lora_packed(y, x if x.stride(-1) == 1 else x.contiguous(), plan.slots, plan.ranks, banks)
        return
    rows = y.contiguous()
    ops().lora_packed(rows, x.contiguous(), plan.slots, plan.ranks, banks)
    y.copy_(rows)


def _readable_b(lora_b: torch.Tensor) -> torch.Tensor:
    """lora_b as it is when the kernel reads its layout (contiguous, or the rank-major view), else a copy."""
    major = lora_b.transpose(1, 2)
    return lora_b if lora_b.is_contiguous() or major.is_contiguous() else lora_b.contiguous()


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
    plan: CpuPlan,
    out_offsets: tuple[int, ...],
    banks=None,
) -> None:
    """A fused projection's update by the plan's route (see LoraBackend.add_lora_packed for the shapes):
    the kernel in one call (`banks`: the site's ops().LoraBanks when it holds them); a torch route with one
    shrink over the packed bank where that reads nothing past the slots' ranks (a single adapter, or a
    decode batch on the dense layout, every used slot at the bank's full rank R), else one update a slice."""
    if not plan.has_lora:
        return
    if plan.route is CpuRoute.KERNEL:
        if banks is None:
            banks = ops().LoraBanks(
                lora_a.contiguous(), [_readable_b(b) for b in lora_bs], scales.float().contiguous(),
                list(out_offsets),
            )  # fmt: skip
        _kernel(y, x, plan, banks)
        return
    if not _packed_by_torch(y, x, lora_a, lora_bs, scales, plan, out_offsets):
        r_max = lora_a.shape[1] // len(lora_bs)
        for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
            add_lora_cpu(y, x, lora_a[:, i * r_max : (i + 1) * r_max], b, scales[i], plan, off)


def _packed_by_torch(y, x, lora_a, lora_bs, scales, plan: CpuPlan, out_offsets) -> bool:
    """The single and dense routes with one shrink over the packed bank, where every used slot has the
    bank's full rank R; False (nothing done) otherwise."""
    batch = plan.segments
    r_max = lora_a.shape[1] // len(lora_bs)
    if batch.max_rank != r_max or any(g.rank != r_max for g in batch.rank_groups):
        return False
    if plan.route is CpuRoute.SINGLE:
        s = batch.single_slot
        v = torch.mm(x, lora_a[s].to(x.dtype).T)  # [T, n·R]: q, k and v (or gate and up) in one GEMM
        for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
            ys = y[:, off : off + b.shape[1]]
            ys.addmm_(v[:, i * r_max : (i + 1) * r_max], b[s].to(x.dtype).T, alpha=float(scales[i, s]))
        return True
    layout = batch.dense
    if lora_a.dtype != x.dtype or plan.route is not CpuRoute.DENSE or layout.tokens is None:
        return False  # bf16 banks under fp32: the per-slice path widens them
    lo, span = layout.lo, layout.span
    xs = x if layout.in_order else x.index_select(0, layout.tokens)
    v = torch.bmm(xs.unsqueeze(1), lora_a[lo : lo + span].transpose(1, 2))  # [span, 1, n·R]
    for i, (b, off) in enumerate(zip(lora_bs, out_offsets, strict=True)):
        vi = v[:, :, i * r_max : (i + 1) * r_max] * scales[i, lo : lo + span].to(v.dtype).view(-1, 1, 1)
        d = torch.bmm(vi, b[lo : lo + span].transpose(1, 2)).squeeze(1)  # [span, H_i]
        _add_dense_rows(y[:, off : off + b.shape[1]], d, layout)
    return True
