"""Prefill attention: the C kernel against SDPA (the runner's path where the kernel does not run), on the
default model's shapes.

SmolLM2-135M's heads (9 query heads over 3 kv heads of 64, 30 layers); q, k and v the strided views of the
fused projection the runner passes. One prompt chunk's attention over every layer, for each (chunk length,
cached context before it): the kernel (`kernels/prefill_attention.py`) against torch's CPU flash kernel
through `F.scaled_dot_product_attention` (causal, or with the chunk's mask after context), interleaved, best
of several runs. The 512-token row is most of the difference in time to first token of a 512-token prompt.

    .venv/bin/python benchmarks/prefill_attention.py [--threads N]

Writes the figures, with date and machine, into the ``## Prefill attention`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch

from hotlora.kernels import native
from hotlora.kernels import prefill_attention as kernel
from hotlora.server.engine.runner import attention
from kernels import best_of, cpu_kernel_args, kernel_table  # benchmarks/kernels.py

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
CASES = [(64, 0), (128, 0), (512, 0), (2048, 0), (64, 448), (512, 1536)]


def chunk(length: int, context: int, path: str):
    """One chunk's attention over every layer, by the kernel or by SDPA."""
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = torch.randn(context + length, width)
    q = qkv[context:, : HEADS * HEAD_DIM].view(length, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(-1, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(-1, KV_HEADS, HEAD_DIM)
    use_kernel = kernel.usable

    def run():
        attention.native_prefill.usable = use_kernel if path == "kernel" else lambda *a: False
        try:
            for _ in range(LAYERS):
                attention._prefill(q, k, v, context, HEAD_DIM**-0.5, None)
        finally:
            attention.native_prefill.usable = use_kernel

    return run


def main() -> None:
    args = cpu_kernel_args(
        argparse.ArgumentParser(description=__doc__.splitlines()[0]), native.unavailable_reason()
    )
    about = (
        f"One prompt chunk's attention over all {LAYERS} layers of SmolLM2-135M ({HEADS} query heads "
        f"over {KV_HEADS} kv heads of {HEAD_DIM}), fp32, {torch.get_num_threads()} threads; best of "
        f"{args.repeats} interleaved runs. SDPA is torch's CPU flash kernel (one query head at a time); "
        "the kernel scores the query heads of a kv head together."
    )

    def rows_measured():
        for length, context in CASES:
            t = best_of({path: chunk(length, context, path) for path in ("sdpa", "kernel")}, args.repeats)
            yield (
                f"| {length} | {context} | {t['sdpa'] * 1e3:.1f} | {t['kernel'] * 1e3:.1f} | "
                f"**{t['sdpa'] / t['kernel']:.2f}×** |"
            )

    header = "| chunk tokens | cached context | SDPA ms | kernel ms | speed-up |"
    kernel_table("Prefill attention", "prefill_attention.py", about, header, rows_measured())


if __name__ == "__main__":
    main()
