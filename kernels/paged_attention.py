"""Decode attention on the paged KV cache in one C call a layer (`paged_decode_attention`,
`csrc/paged_decode_attention.c`), for fp32 on CPUs that run hotlora's C kernels; the runner's torch path
(gather, mask, SDPA) does the rest (server/engine/runner/attention.py)."""

from __future__ import annotations

import torch

from . import native


def usable(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Whether the kernel takes these: fp32 on the CPU, q's head values contiguous, a contiguous pool."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_pool.dtype == torch.float32
        and q.stride(-1) == 1
        and k_pool.is_contiguous()
        and native.available()
    )
