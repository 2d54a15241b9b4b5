"""fp32 activations times weights kept in GGUF's blocks (`gguf_blocks.BlockMatrix`: Q4_0, Q4_1, Q8_0, Q4_K,
Q6_K, F16, BF16), read back as exactly the fp32 numbers the `gguf` package dequantizes them to.

Where they come from: a GGUF file (`--model file.gguf`), `--quantize` (an fp32 checkpoint quantized at
load), or `pack`: a checkpoint whose fp32 weights *are* such values -- a model dequantized from a GGUF file
holds in every run of 32 weights of a row only the values of its block, d * q + m (q in 0..15) for Q4_1,
d * q (q in -127..127) for Q8_0, d and m fp16. The default model is one (Q4_1 projections, a Q8_0 embedding
and tied LM head). `pack` finds that out from the fp32 matrix itself and returns None unless every block
gives back the exact fp32 values, so nothing is ever rounded.

`csrc/block_weights.c` widens each block in registers to those very fp32 values and runs the products and
sums of an fp32 GEMM (in another order) while reading a fraction of the bytes: a decode step is bound by
them. At and above `WIDEN_ROWS` rows (long prefill chunks, compute-bound: MKL's fp32 GEMM is faster), the
matrix is widened to fp32 a band of rows at a time into a thread's scratch and torch runs the GEMM on each
band (for --dtype auto on a bf16-capable CPU, widened straight to bf16 for a bf16 GEMM). Under autograd
(on-line training on a quantized base: QLoRA) the product is the same, and the input's gradient
`dy · W` is taken band by band too: no whole widened copy is made or kept. The kernels are `linear_blocks`,
`widen_blocks` and `widen_blocks_bf16` (kernels/native.py), the format the BlockMatrix's.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .gguf_blocks import BlockMatrix, Format
from .narrow_linear import WIDEN_ROWS, long_chunk
from .native import Unavailable, ops, unavailable_reason

__all__ = [
    "BlockMatrix",
    "Unavailable",
    "embedding",
    "ensure_built",
    "is_packed",
    "linear",
    "pack",
    "unavailable_reason",
    "widen",
    "WIDEN_ROWS",
]

BLOCK = 32  # weights per block (pack's formats)
# A thread's band of a widened matrix for torch's GEMM is written into its scratch (pages warm in cache:
# ~18 ms of a 512-token prefill, 3.5%): a matrix of at most this many weights in one band (a projection's),
# a larger one (an LM head: 28 M on the default model, 262 M on a 1B Llama) in bands of as many.
SCRATCH_FLOATS = 1 << 22
_scratch = threading.local()
_TINY = torch.finfo(torch.float32).tiny  # d of a constant block is 0: its q are 0
_CHECK_ROWS = 64  # rows tried first, so a matrix of other values is turned down at little cost


def is_packed(t) -> bool:
    return isinstance(t, BlockMatrix)


def pack(weight: torch.Tensor) -> BlockMatrix | None:
    """The fp32 matrix [N, K] as Q4_1 blocks or else Q8_0 blocks, or None unless every block's 32 values
    are exactly such a block's -- then `widen(pack(w))` equals w."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK or weight.numel() == 0:
        return None
    w = weight.contiguous().view(weight.shape[0], -1, BLOCK)
    if not torch.isfinite(w[:_CHECK_ROWS]).all():
        return None
    for fmt, blocks in ((Format.Q4_1, _q4_1), (Format.Q8_0, _q8_0)):
        if blocks(w[:_CHECK_ROWS]) is not None:
            parts = blocks(w)
            if parts is not None:
                return BlockMatrix(_layout(*parts), fmt, weight.shape[1])
    return None


def _q4_1(w: torch.Tensor) -> tuple | None:
    """(q uint8 [N, nb, 32], d, m fp32 [N, nb]) with fl(d * q + m) == w, or None."""
    lo, hi = w.amin(-1), w.amax(-1)
    # q = 0 and q = 15 both occur in a block GGUF quantized (its minimum and maximum): m is the block's
    # minimum and d its span over 15, rounded to fp16; the check turns down any block where that is wrong
    m = lo.to(torch.float16).float()
    d = ((hi - lo) / 15).to(torch.float16).float()
    if not torch.equal(m, lo):
        return None
    d_, m_ = d.unsqueeze(-1), m.unsqueeze(-1)
    q = torch.where(d_ > 0, torch.round((w - m_) / d_.clamp_min(_TINY)), 0)
    q = q.clamp_(0, 15)
    if not torch.equal(q * d_ + m_, w):  # d * q is exact in fp32; + m: the one rounding the file had
        return None
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4), d, m)


def _q8_0(w: torch.Tensor) -> tuple | None:
    """(q int8 [N, nb, 32], d fp32 [N, nb]) with d * q == w, or None."""
    d = (w.abs().amax(-1) / 127).to(torch.float16).float()  # q = +-127 occurs: the block's largest magnitude
    d_ = d.unsqueeze(-1)
    q = torch.where(d_ > 0, torch.round(w / d_.clamp_min(_TINY)), 0).clamp_(-127, 127)
    if not torch.equal(q * d_, w):
        return None
    return (q.to(torch.int8), d)


def _layout(q: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    """One row of bytes per matrix row: every block's q, then each scale's fp32 values (csrc layout)."""
    n = q.shape[0]
    parts = [q.reshape(n, -1).view(torch.uint8)] + [
        s.contiguous().view(torch.uint8).view(n, -1) for s in scales
    ]
    return torch.cat(parts, dim=1).contiguous()


def widen(m: BlockMatrix, rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 matrix [N, K] a block matrix holds (only `rows`, int64 indices, when given), into `out` when
    given (contiguous fp32 of that shape)."""
    idx = None if rows is None else rows.to(torch.int64).contiguous()
    try:
        return ops().widen_blocks(m.data, int(m.fmt), idx, out)
    except ValueError as exc:
        if idx is not None and "rows must lie in" in str(exc):
            raise IndexError(f"row index out of range for {m.out_features} rows") from exc
        raise


def widen_bf16(m: BlockMatrix, out: torch.Tensor | None = None) -> torch.Tensor:
    """`widen(m).to(torch.bfloat16)` in one pass (into `out` when given: contiguous bf16 [N, K])."""
    return ops().widen_blocks_bf16(m.data, int(m.fmt), out)


def _band(m: BlockMatrix, start: int, stop: int, dtype: torch.dtype, out: torch.Tensor | None = None):
    """Rows start..stop of the matrix widened to fp32 or bf16 (into `out` when given)."""
    rows = m.data[start:stop]
    if dtype == torch.bfloat16:
        return ops().widen_blocks_bf16(rows, int(m.fmt), out)
    return ops().widen_blocks(rows, int(m.fmt), None, out)


def _bands(m: BlockMatrix, dtype: torch.dtype = torch.float32):
    """(start, stop, widened rows) over the matrix, each band in this thread's scratch of `dtype`: valid
    until the thread's next band."""
    n, k = m.shape
    per = max(1, min(n, SCRATCH_FLOATS // k))
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < per * k:
        buf = torch.empty(max(per * k, SCRATCH_FLOATS), dtype=dtype)
        if per * k <= SCRATCH_FLOATS:  # not kept: a row longer than the scratch
            bufs[dtype] = buf
    for start in range(0, n, per):
        stop = min(n, start + per)
        yield start, stop, _band(m, start, stop, dtype, out=buf[: (stop - start) * k].view(stop - start, k))


def _banded_product(x2: torch.Tensor, m: BlockMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x2 [M, K] . W^T [M, N] by torch's GEMM on the matrix's bands widened to `dtype` (x2 in it too)."""
    y = torch.empty(x2.shape[0], m.out_features, dtype=dtype)
    for start, stop, w in _bands(m, dtype):
        if start == 0 and stop == m.out_features:
            torch.mm(x2, w.t(), out=y)
        else:
            y[:, start:stop] = torch.mm(x2, w.t())
    return y


def embedding(ids: torch.Tensor, m: BlockMatrix) -> torch.Tensor:
    """`F.embedding(ids, widen(m))`, widening only the rows asked for."""
    return widen(m, ids.reshape(-1)).view(*ids.shape, -1)


def linear(
    x: torch.Tensor,
    m: BlockMatrix,
    bias: torch.Tensor | None = None,
    ahead: tuple | None = None,
    long_in_bf16: bool = False,
) -> torch.Tensor:
    """`F.linear(x, widen(m), bias)` for fp32 `x` [..., K] and a block matrix; `ahead`: the rows a LoRA
    update reads next, (banks, step slots), asked for while the kernel computes (LoraSite's `rows_ahead`,
    csrc/rows_ahead.h); `long_in_bf16`: a long
    chunk's product (torch's GEMM) in bf16 arithmetic (`long_product_bf16`). With autograd on, the product
    has a gradient for x (taken band by band), none for the frozen blocks."""
    if not isinstance(m, BlockMatrix) or x.dtype != torch.float32 or x.shape[-1] != m.in_features:
        raise TypeError(
            f"expected float32 x of {getattr(m, 'in_features', '?')} features and a BlockMatrix, "
            f"got {x.dtype} x of {x.shape[-1]} and {type(m).__name__}"
        )
    if x.requires_grad and torch.is_grad_enabled():
        return _BlockProduct.apply(x, m, bias)
    if long_in_bf16 and long_chunk(x):
        return long_product_bf16(x, m, bias)
    return _linear(x, m, bias, ahead)


def long_product_bf16(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with x and the weight rounded to bf16 (a block matrix's bands come
    widened straight to bf16) and summed in fp32 by oneDNN, the product rounded to bf16, then the bias added
    in fp32: on a CPU with avx512_bf16 or AMX a long prefill chunk's GEMM at twice fp32's arithmetic (the
    default model's 512-token prefill on an AMD EPYC: gate_up 12.2 -> 4.7 ms). The numbers are bf16's (the
    runner's bf16 tolerance), for --dtype auto only."""
    if isinstance(weight, BlockMatrix):
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = _banded_product(x2, weight, torch.bfloat16).float().view(*x.shape[:-1], weight.out_features)
    else:
        y = F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float()
    return y if bias is None else y.add_(bias)


def _linear(x: torch.Tensor, m: BlockMatrix, bias: torch.Tensor | None, ahead: tuple | None = None):
    rows = x.numel() // m.in_features if m.in_features else 0
    if rows >= WIDEN_ROWS or rows == 0:  # compute-bound: torch's GEMM on widened bands
        y = _banded_product(x.reshape(-1, m.in_features), m)
        y = y if bias is None else y.add_(bias)
        return y.view(*x.shape[:-1], m.out_features)
    banks, slots = (None, None) if ahead is None else ahead
    return ops().linear_blocks(x, m.data, int(m.fmt), bias, banks, slots)


class _BlockProduct(torch.autograd.Function):
    """y = x . W^T + bias for frozen blocks W: forward as without autograd; backward dx = dy . W, a band of
    W's rows at a time (widened into scratch, never the whole matrix, and nothing kept for the backward but
    the blocks themselves)."""

    @staticmethod
    def forward(ctx, x, m, bias):
        ctx.m = m
        with torch.no_grad():
            return _linear(x.detach(), m, bias)

    @staticmethod
    def backward(ctx, gy):
        m = ctx.m
        g2 = gy.reshape(-1, m.out_features).float()
        dx = torch.zeros(g2.shape[0], m.in_features)
        for start, stop, w in _bands(m):
            dx.addmm_(g2[:, start:stop], w)
        return dx.view(*gy.shape[:-1], m.in_features), None, None


def ensure_built() -> None:
    """Build and load the kernels now; raises Unavailable with the reason."""
    ops()
