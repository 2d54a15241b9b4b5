"""fp32 activations times weights kept in blocks of 32 small integers with a scale, for checkpoints whose
fp32 weights *are* such values: a model dequantized from a GGUF file holds in every run of 32 weights of a
row only the values of its block -- d * q + m (q in 0..15) for Q4_1, d * q (q in -127..127) for Q8_0, d and
m fp16. The default model is one (Q4_1 projections, a Q8_0 embedding and tied LM head).

`pack` finds that out from the fp32 matrix itself and keeps the blocks (a uint8 tensor for Q4_1, int8 for
Q8_0: 0.19 and 0.28 of the fp32 bytes); it returns None unless every block gives back the exact fp32 values,
so nothing is ever rounded. `csrc/block_weights.c` widens each block in registers to those very fp32 values
and runs the products and sums of an fp32 GEMM (in another order) while reading a fraction of the bytes: a
decode step is bound by them.

At and above `WIDEN_ROWS` rows (long prefill chunks, compute-bound: MKL's fp32 GEMM is faster), and whenever
autograd needs a gradient through the product (on-line training), the matrix is widened to fp32 and torch
runs the GEMM (for --dtype auto on a bf16-capable CPU, a long chunk's is widened straight to bf16 for a
bf16 GEMM). The kernels are `linear_blocks`, `widen_blocks` and `widen_blocks_bf16` (kernels/native.py).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .narrow_linear import WIDEN_ROWS, long_chunk, torch_runs
from .native import Unavailable, ops, unavailable_reason

__all__ = [
    "FORMATS",
    "Unavailable",
    "embedding",
    "ensure_built",
    "in_features",
    "is_packed",
    "linear",
    "pack",
    "unavailable_reason",
    "widen",
    "WIDEN_ROWS",
]

BLOCK = 32  # weights per block
# packed dtype -> (name, the kernels' format id (HOTLORA_Q4_1, ... in csrc/kernels.h), bytes per block: q,
# then fp32 d (and m))
FORMATS = {torch.uint8: ("Q4_1", 0, 24), torch.int8: ("Q8_0", 1, 36)}
# A thread's widened copy for torch's GEMM is written into its scratch (pages warm in cache: ~18 ms of a
# 512-token prefill, 3.5%) when autograd will not keep it and it holds at most this many floats (a
# projection's; the LM head's 28 M are widened fresh, and only where many rows want logits).
SCRATCH_FLOATS = 1 << 22
_scratch = threading.local()
_TINY = torch.finfo(torch.float32).tiny  # d of a constant block is 0: its q are 0
_CHECK_ROWS = 64  # rows tried first, so a matrix of other values is turned down at little cost


def is_packed(t: torch.Tensor) -> bool:
    return t.dtype in FORMATS


def in_features(packed: torch.Tensor) -> int:
    return packed.shape[1] // FORMATS[packed.dtype][2] * BLOCK


def block_format(packed: torch.Tensor) -> int:
    """The kernels' format id of a packed matrix."""
    return FORMATS[packed.dtype][1]


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 matrix [N, K] as Q4_1 blocks (uint8 [N, K / 32 * 24]) or else Q8_0 blocks (int8
    [N, K / 32 * 36]), or None unless every block's 32 values are exactly such a block's -- then
    `widen(pack(w))` equals w."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK or weight.numel() == 0:
        return None
    w = weight.contiguous().view(weight.shape[0], -1, BLOCK)
    if not torch.isfinite(w[:_CHECK_ROWS]).all():
        return None
    for blocks in (_q4_1, _q8_0):
        if blocks(w[:_CHECK_ROWS]) is not None:
            parts = blocks(w)
            if parts is not None:
                return _layout(*parts)
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
    parts = [q.reshape(n, -1)] + [s.contiguous().view(q.dtype).view(n, -1) for s in scales]
    return torch.cat(parts, dim=1).contiguous()


def widen(
    packed: torch.Tensor, rows: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The fp32 matrix [N, K] a packed one holds (only `rows`, int64 indices, when given), into `out` when
    given (contiguous fp32 of that shape)."""
    idx = None if rows is None else rows.to(torch.int64).contiguous()
    try:
        return ops().widen_blocks(packed, block_format(packed), idx, out)
    except ValueError as exc:
        if idx is not None and "rows must lie in" in str(exc):
            raise IndexError(f"row index out of range for {packed.shape[0]} rows") from exc
        raise


def widen_bf16(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`widen(packed).to(torch.bfloat16)` in one pass (into `out` when given: contiguous bf16 [N, K])."""
    return ops().widen_blocks_bf16(packed, block_format(packed), out)


def _widen_into_scratch(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """widen(packed), or widen_bf16(packed) for bf16, in this thread's scratch of that dtype when it fits:
    valid until the thread's next call."""
    fn = widen_bf16 if dtype == torch.bfloat16 else widen
    n, k = packed.shape[0], in_features(packed)
    if n * k > SCRATCH_FLOATS:
        return fn(packed)
    bufs = _scratch.__dict__.setdefault("bufs", {})
    if dtype not in bufs:
        bufs[dtype] = torch.empty(SCRATCH_FLOATS, dtype=dtype)
    return fn(packed, out=bufs[dtype][: n * k].view(n, k))


def embedding(ids: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, widen(packed))`, widening only the rows asked for."""
    return widen(packed, ids.reshape(-1)).view(*ids.shape, -1)


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    ahead: tuple | None = None,
    long_in_bf16: bool = False,
) -> torch.Tensor:
    """`F.linear(x, widen(packed), bias)` for fp32 `x` [..., K] and a packed matrix; `ahead`: the rows a
    LoRA update reads next, (banks, step slots), asked for while the kernel computes (LoraSite's
    `rows_ahead`, csrc/rows_ahead.h); `long_in_bf16`:
    a long chunk's product (torch's GEMM) in bf16 arithmetic (`long_product_bf16`)."""
    if long_in_bf16 and long_chunk(x):
        return long_product_bf16(x, _widen_into_scratch(packed, torch.bfloat16), bias)
    if torch_runs(x):
        kept = x.requires_grad and torch.is_grad_enabled()  # autograd keeps the weight for the backward
        return F.linear(x, widen(packed) if kept else _widen_into_scratch(packed), bias)
    if x.dtype != torch.float32 or packed.dtype not in FORMATS or x.shape[-1] != in_features(packed):
        raise TypeError(
            f"expected float32 x of {in_features(packed)} features and a packed matrix, "
            f"got {x.dtype} x of {x.shape[-1]} and {packed.dtype}"
        )
    banks, slots = (None, None) if ahead is None else ahead
    return ops().linear_blocks(x, packed, block_format(packed), bias, banks, slots)


def long_product_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with x and the weight rounded to bf16 (a block matrix's comes widened
    straight to bf16, `widen_bf16`) and summed in fp32 by oneDNN, the product rounded to bf16, then the bias
    added in fp32: on a CPU with avx512_bf16 or AMX a long prefill chunk's GEMM at twice fp32's arithmetic
    (the default model's 512-token prefill on an AMD EPYC: gate_up 12.2 -> 4.7 ms). The numbers are bf16's
    (the runner's bf16 tolerance), for --dtype auto only."""
    y = F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float()
    return y if bias is None else y.add_(bias)


def ensure_built() -> None:
    """Build and load the kernels now; raises Unavailable with the reason."""
    ops()
