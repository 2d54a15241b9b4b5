"""RMSNorm, RoPE, the KV write and the MLP's activation of a decoder layer in one C call each
(`csrc/decoder_ops.c`), for fp32 on CPUs that run hotlora's C kernels. The runner takes them when
`available()`; its torch ops do the rest.

Each is also a torch custom op (`torch.ops.hotlora.*`, with a fake implementation for shapes), which the
public function calls instead while torch.compile traces it: dynamo would otherwise break its graph at every
ctypes call (runner.decode_graphs compiles the decode step)."""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native, torch_ops


@torch.compiler.assume_constant_result  # torch.compile takes the answer as is (no tracing into the build)
def available() -> bool:
    return _loads()


@functools.cache
def _loads() -> bool:
    return native.loads_or_warns(_library, "RMSNorm and RoPE run through torch")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of fp32 rows x [T, H] (rows may be strided)."""
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, eps)
    return _rms_norm(x, weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows, h = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, h, dtype=torch.float32)
    _library().hotlora_rms_norm(
        x.data_ptr(), rows, h, x.stride(0), weight.data_ptr(), eps, out.data_ptr(), _threads(rows * h)
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` of fp32 rows gate_up [T, 2 * I] = [gate | up] (rows may be strided) -> [T, I]."""
    if torch.compiler.is_compiling():
        return _silu_mul_op(gate_up)
    return _silu_mul(gate_up)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty(rows, width // 2, dtype=torch.float32)
    _library().hotlora_silu_mul(
        gate_up.data_ptr(), rows, width // 2, gate_up.stride(0), out.data_ptr(), _threads(rows * width)
    )
    return out


def rope_(qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor, positions):
    """In place: RoPE on the first `heads` heads of each row of qkv [T, *] (contiguous rows);
    cos, sin: [max_positions, head_dim] tables (sin unsigned, as transformers builds them)."""
    if head_dim > 512 or qkv.stride(-1) != 1:
        raise ValueError(f"RoPE kernel: head_dim {head_dim} > 512 or rows not contiguous")
    if torch.compiler.is_compiling():
        _rope_op(qkv, heads, head_dim, cos, sin, positions)
        return
    _rope(qkv, heads, head_dim, cos, sin, positions)


def _rope(qkv, heads: int, head_dim: int, cos, sin, positions) -> None:
    rows = qkv.shape[0]
    pos = positions.to(torch.int64).contiguous()
    _library().hotlora_rope(
        qkv.data_ptr(), rows, qkv.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr(), pos.data_ptr(),
        _threads(rows * heads * head_dim),
    )  # fmt: skip


def kv_write(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, pool: torch.Tensor, layer: int):
    """Layer `layer` of a KV pool [layers, 2, blocks, block_size, kv_heads, d] (K at [layer, 0], V at
    [layer, 1]): rows at `slots` = k/v [T, kv_heads, d] (views of one qkv row each: same row stride).
    The whole pool is the argument, not K's and V's views of it: a compiled graph that saw two mutated views
    of one tensor would copy the pool around every write."""
    if torch.compiler.is_compiling():
        _kv_write_op(k, v, slots, pool, layer)
        return
    _kv_write(k, v, slots, pool, layer)


def _kv_write(k, v, slots, pool, layer: int) -> None:
    rows = k.shape[0]
    width = k.shape[1] * k.shape[2]
    slots = slots.to(torch.int64).contiguous()
    # K's and V's addresses from the strides: indexing pool[layer, 0] costs ~2 µs a view, 30 layers a step
    k_pool = pool.data_ptr() + layer * pool.stride(0) * pool.element_size()
    v_pool = k_pool + pool.stride(1) * pool.element_size()
    _library().hotlora_kv_write(
        k.data_ptr(),
        v.data_ptr(),
        rows,
        k.stride(0),
        width,
        slots.data_ptr(),
        k_pool,
        v_pool,
    )


# ---- the same as torch operators, for torch.compile (kernels/torch_ops.py) -------------------------------
def _kv_write_layer(k, v, slots, pool, layer: int) -> None:
    if k.stride()[1:] != v.stride()[1:] or k.stride(0) != v.stride(0) or k.stride(-1) != 1:
        # a compiled graph may hand the op copies of k and v laid out differently: one row stride is
        # what the C copy reads
        k, v = k.contiguous(), v.contiguous()
    _kv_write(k, v, slots, pool, layer)


_rms_norm_op = torch_ops.define(
    "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    _rms_norm,
    lambda x, weight, eps: x.new_empty(x.shape, dtype=torch.float32),
)
_silu_mul_op = torch_ops.define(
    "silu_mul(Tensor gate_up) -> Tensor",
    _silu_mul,
    lambda gate_up: gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=torch.float32),
)
_rope_op = torch_ops.define(
    "rope_(Tensor(a!) qkv, int heads, int head_dim, Tensor cos, Tensor sin, Tensor positions) -> ()",
    _rope,
    lambda *args: None,
)
_kv_write_op = torch_ops.define(
    "kv_write(Tensor k, Tensor v, Tensor slots, Tensor(a!) pool, int layer) -> ()",
    _kv_write_layer,
    lambda *args: None,
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
    lib.hotlora_silu_mul.argtypes = [p, i64, i64, i64, p, c_int]
    for fn in (lib.hotlora_rms_norm, lib.hotlora_rope, lib.hotlora_kv_write, lib.hotlora_silu_mul):
        fn.restype = c_int
    return lib
