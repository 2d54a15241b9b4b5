"""Decode attention on the paged KV cache: the C kernel against the runner's torch path, on the default model.

SmolLM2-135M's shapes (9 query heads over 3 kv heads of 64, 30 layers, blocks of 16), an fp32 pool the size
of the server's default `--kv-cache-bytes` (2 GiB), the rows' blocks handed out in turn as decoding rows
grow (a row's next block is `rows` blocks on). One step's attention, every layer, for each
(rows, keys per row): the kernel (`kernels/paged_attention.py`) against the torch path the runner takes
where the kernel does not run (gather the blocks, mask, SDPA), interleaved, best of several runs; and the
kernel's K/V bytes per second against torch reading 1 GiB from tensors too large for the cache (what this
machine's memory streams).

    .venv/bin/python benchmarks/decode_attention.py [--threads N]

Writes the figures, with date and machine, into the ``## Decode attention`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch

from hotlora.kernels import native
from hotlora.kernels import paged_attention as kernel
from hotlora.server.engine.runner import attention
from hotlora.server.engine.runner.attention import AttentionMetadata
from kernels import best_of, cpu_kernel_args, kernel_table  # benchmarks/kernels.py

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16
POOL_BYTES = 2 << 30
CASES = [(1, 64), (1, 512), (1, 2048), (8, 256), (32, 64), (32, 256), (32, 1024)]


def step(rows: int, keys: int, pool: torch.Tensor, path: str):
    """One decode step's attention over every layer, by the kernel or by the torch path."""
    blocks = pool.shape[2]
    width = (keys + BLOCK - 1) // BLOCK
    tables = (torch.arange(width)[None, :] * rows + torch.arange(rows)[:, None]) % (blocks - 1) + 1
    lens = torch.full((rows,), keys, dtype=torch.int64)
    meta = AttentionMetadata(
        num_decode=rows, decode_tables=tables, decode_lens=lens, prefills=(), slot_mapping=lens - 1
    )
    q = torch.randn(rows, HEADS, HEAD_DIM)
    use_kernel = kernel.usable

    def run():
        attention.native_decode.usable = use_kernel if path == "kernel" else lambda *a: False
        try:
            for layer in range(LAYERS):
                attention.paged_attention(q, None, None, pool[layer, 0], pool[layer, 1], meta, 0.125, None)
        finally:
            attention.native_decode.usable = use_kernel

    return run


def stream_rate(nbytes: int, repeats: int) -> float:
    """Bytes per second torch reads from tensors too large for the cache (a sum over each)."""
    chunks = [torch.ones(nbytes // 4 // 8) for _ in range(8)]  # 8 x nbytes/8, visited in turn: cold each time
    t = best_of({"sum": lambda: [c.sum() for c in chunks]}, repeats)["sum"]
    return nbytes / t


def main() -> None:
    args = cpu_kernel_args(
        argparse.ArgumentParser(description=__doc__.splitlines()[0]), native.unavailable_reason()
    )
    per_block = 2 * LAYERS * BLOCK * KV_HEADS * HEAD_DIM * 4
    pool = torch.randn(LAYERS, 2, POOL_BYTES // per_block, BLOCK, KV_HEADS, HEAD_DIM)
    stream = stream_rate(1 << 30, args.repeats)
    about = (
        f"One decode step's attention over all {LAYERS} layers of SmolLM2-135M ({HEADS} query heads over "
        f"{KV_HEADS} kv heads of {HEAD_DIM}), an fp32 pool of {POOL_BYTES >> 30} GiB, a row's next block "
        f"`rows` blocks on (handed out in turn as the rows grow); best of {args.repeats} interleaved runs. "
        f"Memory: torch reads {stream / 1e9:.1f} GB/s from cold tensors in this process."
    )

    def rows_measured():
        for rows, keys in CASES:
            fns = {path: step(rows, keys, pool, path) for path in ("torch", "kernel")}
            t = best_of(fns, args.repeats)
            kv_bytes = LAYERS * rows * keys * KV_HEADS * HEAD_DIM * 2 * 4
            rate = kv_bytes / t["kernel"]
            yield (
                f"| {rows} | {keys} | {t['torch'] * 1e3:.2f} | {t['kernel'] * 1e3:.2f} | "
                f"**{t['torch'] / t['kernel']:.1f}×** | {rate / 1e9:.1f} | {rate / stream:.0%} |"
            )

    header = "| rows | keys per row | torch path ms | kernel ms | speed-up | kernel K/V GB/s | of memory's |"
    kernel_table("Decode attention", "decode_attention.py", about, header, rows_measured())


if __name__ == "__main__":
    main()
