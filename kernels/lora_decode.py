"""The CPU path's multi-LoRA update of batches of short segments in C (`csrc/lora_decode.c`): each run of
tokens on one slot reads its adapter from the banks in place, once, per-slot ranks honoured, for fp32
activations on CPUs that run hotlora's C kernels; the banks fp32, or bf16 (`--adapter-dtype bfloat16`, and
its default under `--weight-dtype bfloat16`), widened as they are read.

Used by kernels.cpu for decode batches (one token per slot, where the adapters' bytes are the whole cost) and
prefills of many adapters or few tokens (where torch would pay its dispatch per segment). `packed` is also
the custom op `torch.ops.hotlora.lora_packed`, which it calls while torch.compile traces it (a compiled
decode step has no graph break at the ctypes call)."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import native, torch_ops
from .rows_ahead import SiteBanks


def usable(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == y.dtype == torch.float32
        and x.stride(-1) == 1
        and y.stride(-1) == 1
        and _banks_readable(lora_a, (lora_b,))
    )


def _banks_readable(lora_a: torch.Tensor, lora_bs: tuple[torch.Tensor, ...]) -> bool:
    # bf16 banks: --adapter-dtype bfloat16 (by default under --weight-dtype bfloat16)
    return (
        lora_a.dtype in (torch.float32, torch.bfloat16)
        and all(b.dtype == lora_a.dtype for b in lora_bs)
        and lora_a.is_contiguous()
        and one_layout(lora_bs)
        and available()
    )


def b_layout(lora_b: torch.Tensor) -> str | None:
    """'' for a contiguous [S, H_out, R] bank, '_t' for the rank-major one the CPU backend keeps (storage
    [S, R, H_out], seen through a transposed view: the expand then needs no horizontal sums), None for
    any other layout (the kernel cannot read it)."""
    _, h, r = lora_b.shape
    stride = lora_b.stride()
    if stride == (h * r, r, 1) or lora_b.is_contiguous():  # strides first: a decode step asks ~500 times
        return ""
    if stride == (h * r, 1, h) or lora_b.transpose(1, 2).is_contiguous():
        return "_t"
    return None


def shrink(x: torch.Tensor, slots: torch.Tensor, lora_a: torch.Tensor, slices: int, ranks: torch.Tensor):
    """u [T, slices * R]: u[t, i*R + j] = A[s_t, i*R + j] . x[t] for j < rank(s_t), zero elsewhere.
    lora_a: [S, slices * R, H_in]."""
    tokens, k = x.shape
    rows = lora_a.shape[1]
    u = torch.empty(tokens, rows, dtype=torch.float32)
    slots, ranks = _i64(slots), _i64(ranks)
    fn = (
        _library().hotlora_lora_shrink_bf16
        if lora_a.dtype == torch.bfloat16
        else _library().hotlora_lora_shrink
    )
    fn(
        x.data_ptr(), tokens, x.stride(0), slots.data_ptr(), lora_a.data_ptr(), rows, k, slices,
        rows // slices, ranks.data_ptr(), u.data_ptr(), _threads(tokens * rows * k),
    ) and _out_of_memory(tokens)  # fmt: skip
    return u


def expand(
    ys: torch.Tensor,
    u: torch.Tensor,
    u_offset: int,
    slots: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """ys[t] += scales[s_t] · B[s_t, :, :rank] · u[t, u_offset : u_offset + rank], in place.
    ys: [T, H_out] (a column slice of y is fine); lora_b: [S, H_out, R] (either b_layout); scales: [S]."""
    tokens, n = ys.shape
    r_max = lora_b.shape[2]
    slots, ranks, scales = _i64(slots), _i64(ranks), _f32(scales)
    fn = getattr(_library(), "hotlora_lora_expand" + _suffix(lora_b))
    fn(
        u.data_ptr(), tokens, u.stride(0), u_offset, slots.data_ptr(), lora_b.data_ptr(), n, r_max,
        ranks.data_ptr(), scales.data_ptr(), ys.data_ptr(), ys.stride(0), _threads(tokens * n * r_max),
    ) and _out_of_memory(tokens)  # fmt: skip


def packed(
    y: torch.Tensor,
    x: torch.Tensor,
    slots: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: tuple[torch.Tensor, ...],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    offsets: tuple[int, ...],
) -> None:
    """A fused projection's update in one call: `shrink` over the packed bank [S, n·R, H_in], then `expand`
    of slice i into y's columns offsets[i]: (lora_bs[i]: [S, H_i, R], all of one b_layout; scales: [n, S]
    float32)."""
    if torch.compiler.is_compiling():
        _packed_op(y, x, slots, lora_a, list(lora_bs), ranks, scales, list(offsets))
        return
    _packed(y, x, slots, lora_a, lora_bs, ranks, scales, offsets)


def _packed(y, x, slots, lora_a, lora_bs, ranks, scales, offsets) -> None:
    scales = _f32(scales)
    bound = _bound(tuple(lora_bs), tuple(offsets))
    _run_packed(bound, lora_a.data_ptr(), scales.data_ptr(), scales.shape[1], y, x, _i64(slots), _i64(ranks))


def _run_packed(bound: _Bound, a: int, scales: int, num_slots: int, y, x, slots, ranks) -> None:
    """The packed kernel on x [T, k] (k: the A bank's in-features), y, int64 slots and ranks; `a` and
    `scales` the addresses of the A bank and the [n, num_slots] fp32 scales."""
    tokens, k = x.shape
    n, r_max = bound.slices, bound.r_max
    u = torch.empty(tokens, n * r_max, dtype=torch.float32)
    bound.fn(
        x.data_ptr(), tokens, x.stride(0), slots.data_ptr(), a, k, n, r_max, ranks.data_ptr(), u.data_ptr(),
        bound.pointers, bound.outs, bound.offsets, scales, num_slots, y.data_ptr(), y.stride(0),
        _threads(tokens * n * r_max * k), _threads(tokens * bound.total_out * r_max),
    ) and _out_of_memory(tokens)  # fmt: skip


_packed_op = torch_ops.define(  # for torch.compile (kernels/torch_ops.py)
    "lora_packed(Tensor(a!) y, Tensor x, Tensor slots, Tensor lora_a, Tensor[] lora_bs, Tensor ranks, "
    "Tensor scales, int[] offsets) -> ()",
    _packed,
    lambda *args: None,
)


class PackedSite:
    """`packed` for one site whose banks stay the same tensors (a LoRA site's bank is written in place): the
    kernel build, the B slices' addresses and the banks' pointers are worked out here once, so each call
    pays only the ctypes call (~10 µs of Python less a site at one decode row; ~120 sites a step).
    The caller has checked the call (kernels.cpu.NativePackedSite): x [T, in] and y [T, >= out] fp32 rows
    with unit column stride, slots [T] and ranks [S] int64 contiguous."""

    def __init__(
        self, lora_a: torch.Tensor, lora_bs: tuple[torch.Tensor, ...], scales: torch.Tensor, offsets
    ):
        if not (lora_a.is_contiguous() and scales.dtype == torch.float32 and scales.is_contiguous()):
            raise ValueError("PackedSite: the A bank and the fp32 scales must be contiguous")
        self._bound = _bound(tuple(lora_bs), tuple(offsets))
        self._banks = (lora_a, tuple(lora_bs), scales)  # the pointers below stay valid while these live
        self.in_features = lora_a.shape[2]
        self.out_features = max(off + b.shape[1] for b, off in zip(lora_bs, offsets, strict=True))
        self._a, self._scales, self._num_slots = lora_a.data_ptr(), scales.data_ptr(), scales.shape[1]
        self.banks_ahead = SiteBanks(lora_a, tuple(lora_bs))  # for the base product before it to prefetch

    def __call__(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor) -> None:
        _run_packed(self._bound, self._a, self._scales, self._num_slots, y, x, slots, ranks)


@dataclass(frozen=True)
class _Bound:
    """What `packed` passes for one set of B banks, worked out once: the kernel build that reads them, and
    the slices' addresses, output sizes and offsets as int64 arrays (kept alive here) with their pointers."""

    fn: object
    slices: int
    r_max: int
    total_out: int
    arrays: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    pointers: int
    outs: int
    offsets: int


_bound_sets: dict[tuple, _Bound] = {}


def _bound(lora_bs: tuple[torch.Tensor, ...], offsets: tuple[int, ...]) -> _Bound:
    # keyed by everything the entry depends on: memory a freed bank leaves can hold another of a new shape
    key = (*((b.data_ptr(), b.shape, b.stride(), b.dtype) for b in lora_bs), *offsets)
    bound = _bound_sets.get(key)
    if bound is None:
        outs = [b.shape[1] for b in lora_bs]
        arrays = (
            torch.tensor([b.data_ptr() for b in lora_bs], dtype=torch.int64),
            torch.tensor(outs, dtype=torch.int64),
            torch.tensor(offsets, dtype=torch.int64),
        )
        fn = getattr(_library(), "hotlora_lora_packed" + _suffix(*lora_bs))
        bound = _Bound(
            fn, len(lora_bs), lora_bs[0].shape[2], sum(outs), arrays, *(a.data_ptr() for a in arrays)
        )
        _bound_sets[key] = bound
    return bound


def bindable(lora_a: torch.Tensor, lora_bs: tuple[torch.Tensor, ...], scales: torch.Tensor) -> bool:
    """Whether a PackedSite can be built on these banks (what `usable` asks of them, and fp32 scales)."""
    return (
        lora_a.device.type == "cpu"
        and all(b.device.type == "cpu" for b in lora_bs)
        and scales.dtype == torch.float32
        and scales.is_contiguous()
        and _banks_readable(lora_a, tuple(lora_bs))
    )


def one_layout(lora_bs: tuple[torch.Tensor, ...]) -> bool:
    """Whether `packed` reads these B banks in one call (one b_layout the kernel knows)."""
    layouts = {b_layout(b) for b in lora_bs}
    return len(layouts) == 1 and None not in layouts


def _suffix(*lora_bs: torch.Tensor) -> str:
    """Which of the kernel's builds reads these B banks: layout, then bank dtype."""
    if not one_layout(lora_bs):
        raise ValueError(f"B banks of one layout expected, got strides {[b.stride() for b in lora_bs]}")
    return b_layout(lora_bs[0]) + ("_bf16" if lora_bs[0].dtype == torch.bfloat16 else "")


def _out_of_memory(tokens: int) -> None:
    # the kernels return -1 only when the heap cannot hold their table of token runs
    raise MemoryError(f"the LoRA kernel could not allocate its table of runs for {tokens} tokens")


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= 1 << 16 else 1


@torch.compiler.assume_constant_result  # torch.compile takes the answer as is (no tracing into the build)
def available() -> bool:
    return _loads()


@functools.cache
def _loads() -> bool:
    return native.loads_or_warns(_library, "decode LoRA runs through torch")


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.library("lora_decode")
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for dtype in ("", "_bf16"):
        shrink = getattr(lib, "hotlora_lora_shrink" + dtype)
        shrink.argtypes = [p, i64, i64, p, p, i64, i64, i64, i64, p, p, c_int]
        shrink.restype = c_int
        for layout in ("", "_t"):
            expand = getattr(lib, "hotlora_lora_expand" + layout + dtype)
            expand.argtypes = [p, i64, i64, i64, p, p, i64, i64, p, p, p, i64, c_int]
            fused = getattr(lib, "hotlora_lora_packed" + layout + dtype)
            fused.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p, p, p, p, p, i64, p, i64, c_int, c_int]
            expand.restype = fused.restype = c_int
    return lib
