"""The bf16-weight kernel (`--weight-dtype bfloat16`) against torch's fp32 GEMM on the same weights.

Every projection of SmolLM2-135M (30 layers of fused q/k/v, o, fused gate/up and down, and the LM head: 121
matrices, as one decode step multiplies them) at a given number of rows; fp32 `F.linear` on fp32 weights
against `kernels.bf16_weights.linear` on the same weights stored in bf16, interleaved, best of several runs.

    .venv/bin/python benchmarks/bf16_weights.py [--threads N] [--rows 1,4,8,32,128]

Writes the figures, with date and machine, into the ``## bf16 weights`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.nn.functional as F
from results_file import RESULTS, write_lines

from hotlora.kernels import bf16_weights
from kernels import cpu_kernel_args, machine  # benchmarks/kernels.py

HIDDEN, INTERMEDIATE, QKV, LAYERS, VOCAB = 576, 1536, 960, 30, 49152


def shapes() -> list[tuple[int, int]]:
    """(out, in) of each matrix one decode step multiplies, in order."""
    layer = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    return layer * LAYERS + [(VOCAB, HIDDEN)]


def measure(rows: int, weights32, weights16, repeats: int) -> tuple[float, float]:
    xs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}

    def fp32():
        for w in weights32:
            F.linear(xs[w.shape[1]], w)

    def bf16():
        for w in weights16:
            bf16_weights.linear(xs[w.shape[1]], w)

    best = {fp32: float("inf"), bf16: float("inf")}
    for _ in range(repeats):
        for fn in best:
            t = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - t)
    return best[fp32], best[bf16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,128", help="rows of x (decode: the batch size)")
    args = cpu_kernel_args(parser, bf16_weights.unavailable_reason())
    weights32 = [torch.randn(n, k) * 0.05 for n, k in shapes()]
    weights16 = [w.to(torch.bfloat16) for w in weights32]
    bytes32 = sum(w.nbytes for w in weights32)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"Measured {now} on {machine()} by `benchmarks/bf16_weights.py`"
        f" (load average at start: {os.getloadavg()[0]:.1f}).",
        "",
        f"The {len(weights32)} matrices of one SmolLM2-135M decode step ({bytes32 / 2**20:.0f} MiB in fp32), "
        "fp32 `F.linear` against the kernel on the same weights stored in bf16; best of "
        f"{args.repeats} interleaved runs.",
        "",
        "| rows | fp32 F.linear ms | bf16 weights ms | speed-up | bf16 weight GB/s |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            t32, t16 = measure(rows, weights32, weights16, args.repeats)
            gbs = bytes32 / 2 / t16 / 1e9
            row = f"| {rows} | {t32 * 1e3:.1f} | {t16 * 1e3:.1f} | **{t32 / t16:.2f}×** | {gbs:.1f} |"
            lines.append(row)
            print(row, flush=True)
    write_lines("bf16 weights", lines)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
