"""How the base weights are stored, against torch's fp32 GEMM on the same weights: GGUF blocks (the default
for a checkpoint dequantized from a GGUF file, read back as the same fp32 numbers) and bf16
(`--weight-dtype bfloat16`, rounded).

Every projection of SmolLM2-135M (30 layers of fused q/k/v, o, fused gate/up and down, and the LM head: 121
matrices, as one decode step multiplies them) at a given number of rows. The weights are random values put
through GGUF's own Q4_1 (projections) and Q8_0 (LM head) quantize and dequantize, as the default model's
are; fp32 `F.linear` on them against `kernels.block_weights.linear` on their blocks and
`kernels.bf16_weights.linear` on their bf16 rounding, interleaved, best of several runs.

    .venv/bin/python benchmarks/weight_storage.py [--threads N] [--rows 1,4,8,32,128]

Writes the figures, with date and machine, into the ``## Weight storage`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from hotlora.kernels import bf16_weights, block_weights
from kernels import best_of, cpu_kernel_args, kernel_table  # benchmarks/kernels.py

HIDDEN, INTERMEDIATE, QKV, LAYERS, VOCAB = 576, 1536, 960, 30, 49152


def shapes() -> list[tuple[int, int]]:
    """(out, in) of each matrix one decode step multiplies, in order."""
    layer = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    return layer * LAYERS + [(VOCAB, HIDDEN)]


def gguf_matrix(n: int, k: int, kind: GGMLQuantizationType) -> torch.Tensor:
    w = (np.random.standard_normal((n, k)) * 0.05).astype(np.float32)
    back = quants.dequantize(quants.quantize(w, kind), kind)
    return torch.from_numpy(np.ascontiguousarray(back)).view(n, k)


def measure(rows: int, stores: dict, repeats: int) -> dict[str, float]:
    xs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
    linears = {"fp32": F.linear, "blocks": block_weights.linear, "bf16": bf16_weights.linear}

    def run(name):
        linear = linears[name]
        for w, k in stores[name]:
            linear(xs[k], w)

    return best_of({name: functools.partial(run, name) for name in stores}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,128", help="rows of x (decode: the batch size)")
    args = cpu_kernel_args(parser, bf16_weights.unavailable_reason() or block_weights.unavailable_reason())
    np.random.seed(0)
    kinds = [GGMLQuantizationType.Q4_1] * (4 * LAYERS) + [GGMLQuantizationType.Q8_0]
    fp32 = [gguf_matrix(n, k, kind) for (n, k), kind in zip(shapes(), kinds, strict=True)]
    blocks = [block_weights.pack(w) for w in fp32]
    assert all(b is not None for b in blocks), "a GGUF matrix did not pack"
    stores = {
        "fp32": [(w, w.shape[1]) for w in fp32],
        "blocks": [(b, w.shape[1]) for b, w in zip(blocks, fp32, strict=True)],
        "bf16": [(w.to(torch.bfloat16), w.shape[1]) for w in fp32],
    }
    nbytes = {name: sum(w.nbytes for w, _ in ws) for name, ws in stores.items()}
    about = (
        f"The {len(fp32)} matrices of one SmolLM2-135M decode step, of GGUF Q4_1/Q8_0 values as the default "
        f"model's: fp32 `F.linear` ({nbytes['fp32'] / 2**20:.0f} MiB) against hotlora's kernels on the same "
        f"weights kept as GGUF blocks ({nbytes['blocks'] / 2**20:.0f} MiB, the same numbers) and stored in "
        f"bf16 ({nbytes['bf16'] / 2**20:.0f} MiB, rounded); best of {args.repeats} interleaved runs."
    )

    def rows_measured():
        for rows in (int(r) for r in args.rows.split(",")):
            t = measure(rows, stores, args.repeats)
            gbs = nbytes["blocks"] / t["blocks"] / 1e9
            ms = {name: f"{v * 1e3:.1f}" for name, v in t.items()}
            yield (
                f"| {rows} | {ms['fp32']} | {ms['blocks']} | **{t['fp32'] / t['blocks']:.2f}×** | {gbs:.1f}"
                f" | {ms['bf16']} | {t['fp32'] / t['bf16']:.2f}× |"
            )

    header = "| rows | fp32 ms | blocks ms | speed-up | blocks GB/s | bf16 ms | speed-up |"
    kernel_table("Weight storage", "weight_storage.py", about, header, rows_measured())


if __name__ == "__main__":
    main()
