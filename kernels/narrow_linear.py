"""What the GEMMs on weights kept narrower than fp32 (`bf16_weights.py`, `block_weights.py`) share on the
Python side: when torch's fp32 GEMM on a widened copy runs instead of the kernel, and the call of a kernel
on x's rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Rows of x from which torch's fp32 GEMM on a widened copy beats the kernels (SmolLM2 shapes: the bf16
# kernel at 1.07x MKL's speed at 128 rows, 0.62x at 512; the block kernel 1.0x at 256, 0.65x at 512).
WIDEN_ROWS = 256
# Below this many multiply-adds one thread does it: waking a second one costs more than it saves.
PARALLEL_FROM = 1 << 16


def torch_runs(x: torch.Tensor) -> bool:
    """Whether torch's GEMM on a widened copy serves x: long prefill chunks, no rows, or a gradient wanted
    through the product (on-line training)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return rows >= WIDEN_ROWS or rows == 0 or (x.requires_grad and torch.is_grad_enabled())


def long_chunk(x: torch.Tensor) -> bool:
    """Whether x is a long prefill chunk's rows (WIDEN_ROWS or more) whose product autograd does not keep:
    where `block_weights.long_product_bf16` may serve."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return rows >= WIDEN_ROWS and not (x.requires_grad and torch.is_grad_enabled())


def on_rows(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, kernel: Callable, what: str):
    """y [..., n] = kernel over x's rows: `kernel(x_ptr, rows, y_ptr, bias_ptr or None, threads)` returns
    the C function's status (0, or -1 when it had no scratch memory)."""
    flat = x.dim() == 2 and x.is_contiguous()  # the runner's rows: no reshape (~1 µs each, ~120 a step)
    x2 = x if flat else x.reshape(-1, k).contiguous()
    rows = x2.shape[0]
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    threads = torch.get_num_threads() if rows * n * k >= PARALLEL_FROM else 1
    status = kernel(x2.data_ptr(), rows, y.data_ptr(), None if b is None else b.data_ptr(), threads)
    if status != 0:
        raise MemoryError(f"{what}: no scratch memory for {rows} x {k}")
    return y if flat else y.view(*x.shape[:-1], n)
