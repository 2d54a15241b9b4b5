"""Decode attention on the paged KV cache in one C call a layer (`csrc/paged_decode_attention.c`), for fp32 on
CPUs that run hotlora's C kernels; the runner's torch path (gather, mask, SDPA) does the rest. While
torch.compile traces it, it runs as the custom op `torch.ops.hotlora.paged_decode_attention` (no graph
break at the ctypes call)."""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native, torch_ops


def usable(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_pool.dtype == torch.float32
        and q.stride(-1) == 1
        and k_pool.is_contiguous()
        and available()
    )


def decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
    out: torch.Tensor,
) -> None:
    """q: [D, heads, d] (d contiguous); pools: [blocks, bs, kv_heads, d]; tables: [D, width] int64;
    lens: [D] int64 (keys each row sees, its own included); out: [D, heads, d] contiguous, written."""
    if torch.compiler.is_compiling():
        out.copy_(_decode_op(q, k_pool, v_pool, tables, lens, scale, window or 0))
        return
    _decode(q, k_pool, v_pool, tables, lens, scale, window, out)


def _decode(q, k_pool, v_pool, tables, lens, scale: float, window: int | None, out) -> None:
    rows, heads, d = q.shape
    _, bs, kv_heads, _ = k_pool.shape
    tables = tables.contiguous()
    lens = lens.contiguous()
    status = _library().hotlora_paged_decode_attention(
        q.data_ptr(),
        rows,
        heads,
        d,
        q.stride(0),
        q.stride(1),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        bs,
        kv_heads,
        tables.data_ptr(),
        tables.shape[1],
        lens.data_ptr(),
        window or 0,
        scale,
        out.data_ptr(),
        torch.get_num_threads() if rows * kv_heads > 1 else 1,
    )
    if status != 0:
        raise MemoryError("paged decode attention: no scratch memory")


def _decode_new(q, k_pool, v_pool, tables, lens, scale: float, window: int) -> torch.Tensor:
    out = q.new_empty(q.shape)
    _decode(q, k_pool, v_pool, tables, lens, scale, window, out)
    return out


_decode_op = torch_ops.define(  # for torch.compile (kernels/torch_ops.py)
    "paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tables, Tensor lens, float scale, "
    "int window) -> Tensor",
    _decode_new,
    lambda q, *args: q.new_empty(q.shape),
)


@torch.compiler.assume_constant_result  # torch.compile takes the answer as is (no tracing into the build)
def available() -> bool:
    return _loads()


@functools.cache
def _loads() -> bool:
    return native.loads_or_warns(_library, "decode attention runs through torch")


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.library("paged_decode_attention")
    fn = lib.hotlora_paged_decode_attention
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        p,
        p,
        i64,
        i64,
        p,
        i64,
        p,
        i64,
        ctypes.c_float,
        p,
        ctypes.c_int,
    ]
    fn.restype = ctypes.c_int
    return lib
