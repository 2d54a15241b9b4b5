"""What the GEMMs on weights kept narrower than fp32 (`bf16_weights.py`, `block_weights.py`) share on the
Python side: when torch's fp32 GEMM on a widened copy runs instead of the kernel."""

from __future__ import annotations

import torch

# Rows of x from which torch's fp32 GEMM on a widened copy beats the kernels (SmolLM2 shapes: the bf16
# kernel at 1.07x MKL's speed at 128 rows, 0.62x at 512; the block kernel 1.0x at 256, 0.65x at 512).
WIDEN_ROWS = 256


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
