"""RMSNorm, RoPE and the KV write of a decoder layer in one C call each (`csrc/decoder_ops.c`), for fp32 on
CPUs that run hotlora's C kernels. The runner takes them when `available()`; its torch ops do the rest."""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native


@functools.cache
def available() -> bool:
    return native.loads_or_warns(_library, "RMSNorm and RoPE run through torch")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of fp32 rows x [T, H] (rows may be strided)."""
    rows, h = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, h, dtype=torch.float32)
    _library().hotlora_rms_norm(
        x.data_ptr(), rows, h, x.stride(0), weight.data_ptr(), eps, out.data_ptr(), _threads(rows * h)
    )
    return out


def rope_(qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor, positions):
    """In place: RoPE on the first `heads` heads of each row of qkv [T, *] (contiguous rows);
    cos, sin: [max_positions, head_dim] tables (sin unsigned, as transformers builds them)."""
    if head_dim > 512 or qkv.stride(-1) != 1:
        raise ValueError(f"RoPE kernel: head_dim {head_dim} > 512 or rows not contiguous")
    rows = qkv.shape[0]
    pos = positions.to(torch.int64).contiguous()
    _library().hotlora_rope(
        qkv.data_ptr(), rows, qkv.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr(), pos.data_ptr(),
        _threads(rows * heads * head_dim),
    )  # fmt: skip


def kv_write(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor
):
    """k_pool/v_pool rows at `slots` = k/v [T, kv_heads, d] (views of one qkv row each: same row stride)."""
    rows = k.shape[0]
    width = k.shape[1] * k.shape[2]
    slots = slots.to(torch.int64).contiguous()
    _library().hotlora_kv_write(
        k.data_ptr(),
        v.data_ptr(),
        rows,
        k.stride(0),
        width,
        slots.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
    )


def _threads(work: int) -> int:
    return torch.get_num_threads() if work >= 1 << 16 else 1


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.library("decoder_ops")
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hotlora_rms_norm.argtypes = [p, i64, i64, i64, p, ctypes.c_float, p, c_int]
    lib.hotlora_rope.argtypes = [p, i64, i64, i64, i64, p, p, p, c_int]
    lib.hotlora_kv_write.argtypes = [p, p, i64, i64, i64, p, p, p]
    for fn in (lib.hotlora_rms_norm, lib.hotlora_rope, lib.hotlora_kv_write):
        fn.restype = c_int
    return lib
