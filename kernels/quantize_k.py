"""fp32 rows -> GGUF Q4_K / Q6_K blocks with llama.cpp's reference quantizers (`csrc/quantize_k.c`, a port
that gives llama-quantize's bytes for a model quantized without an importance matrix). The `gguf` package
has no quantizer for these types; `gguf_blocks.quantize` calls this one."""

from __future__ import annotations

import torch

from .native import ops

BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}  # GGUF's bytes per 256 weights


def quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x: fp32 [N, K], K a multiple of 256 -> uint8 [N, K / 256 * block bytes]: GGUF's blocks, row by row.
    Raises native.Unavailable where the C quantizer cannot be built."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] % 256:
        raise ValueError(
            f"{kind} quantizes fp32 [N, K] with K a multiple of 256, got {x.dtype} {list(x.shape)}"
        )
    if kind not in BLOCK_BYTES:
        raise ValueError(f"no K-quant {kind!r}; one of {', '.join(BLOCK_BYTES)}")
    from .gguf_blocks import Format

    return ops().quantize_k(x.contiguous(), int(Format[kind]))
