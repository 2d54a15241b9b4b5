"""The block kernel on a Llama-3.2-1B decode step's matrices, type by type: the 16 layers' fused q/k/v, o,
fused gate/up and down and the tied LM head (65 matrices, 1.24 B weights), all in one GGUF type (Q4_0, Q8_0,
Q4_K, Q6_K) or mixed as llama.cpp's Q4_K_M file keeps them (Q4_K; Q6_K for the LM head and, in half the
layers, v and down), at a given number of rows; the bytes read per second beside the machine's read
bandwidth (a sum over 1 GiB, torch's threads), best of several runs. Random valid blocks: the kernel's
speed does not depend on the values.

    .venv/bin/python benchmarks/block_formats.py [--rows 1,8,32] [--formats q4_0,q8_0,q4_k,q6_k,q4_k_m]

Prints a table; with --write, into the ``## Block formats`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from hotlora.kernels import block_weights, gguf_blocks
from hotlora.kernels.gguf_blocks import Format

H, INTER, Q, KV, LAYERS, VOCAB = 2048, 8192, 2048, 512, 16, 128256


def shapes() -> list[tuple[str, int, int]]:
    """(name, out, in) of each matrix one decode step multiplies."""
    out = []
    for i in range(LAYERS):
        out += [(f"{i}.q", Q, H), (f"{i}.k", KV, H), (f"{i}.v", KV, H), (f"{i}.o", H, Q),
                (f"{i}.gate_up", 2 * INTER, H), (f"{i}.down", H, INTER)]  # fmt: skip
    return out + [("lm_head", VOCAB, H)]


def q4_k_m(name: str) -> Format:
    """llama-quantize's Q4_K_M choice (use_more_bits: the first and last eighth of the layers and every
    third one between get Q6_K for v and down)."""
    if name == "lm_head":
        return Format.Q6_K
    layer, kind = name.split(".")
    i = int(layer)
    more = i < LAYERS // 8 or i >= 7 * LAYERS // 8 or (i - LAYERS // 8) % 3 == 2
    return Format.Q6_K if kind in ("v", "down") and more else Format.Q4_K


def random_matrix(fmt: Format, n: int, k: int, rng) -> gguf_blocks.BlockMatrix:
    kind = GGMLQuantizationType[fmt.name]
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    half = np.full((n, k // block), 0.01, np.float16).view(np.uint8).reshape(n, k // block, 2)
    for at in {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[fmt.name]:
        raw[..., at : at + 2] = half
    return gguf_blocks.from_gguf(raw.reshape(n, -1), kind, (n, k))


def fused(parts: list[gguf_blocks.BlockMatrix]) -> list:
    """q, k, v as one matrix when they share a type (as the runner fuses them)."""
    if len({p.fmt for p in parts}) == 1:
        return [parts[0].with_data(torch.cat([p.data for p in parts]))]
    return parts


def build(formats: str) -> list[gguf_blocks.BlockMatrix]:
    rng = np.random.default_rng(0)
    mats, pending = [], []
    for name, n, k in shapes():
        fmt = q4_k_m(name) if formats == "q4_k_m" else Format[formats.upper()]
        m = random_matrix(fmt, n, k, rng)
        if name.split(".")[-1] in ("q", "k", "v"):
            pending.append(m)
            if name.endswith(".v"):
                mats += fused(pending)
                pending = []
        else:
            mats.append(m)
    return mats


def read_bandwidth() -> float:
    t = torch.ones(1 << 28)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        float(t.sum())
        best = max(best, t.numel() * 4 / (time.perf_counter() - t0))
    return best


def step_seconds(mats, rows: int, repeats: int) -> float:
    xs = {k: torch.randn(rows, k) for k in (H, INTER)}
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in mats:
            block_weights.linear(xs[m.in_features], m)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--formats", default="q4_0,q8_0,q4_k,q6_k,q4_k_m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    import os

    lines = [
        f"Llama-3.2-1B's 65 matrices of a decode step (1.24 B weights), {args.threads} threads, best of "
        f"{args.repeats}; read bandwidth {bandwidth / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}.",
        "",
        "| format | GiB | rows | step ms | GB/s read | of the bandwidth | tok/s of the matrices |",
        "|---|---|---|---|---|---|---|",
    ]
    print(lines[0])
    for formats in args.formats.split(","):
        mats = build(formats)
        nbytes = sum(m.nbytes for m in mats)
        for rows in (int(r) for r in args.rows.split(",")):
            s = step_seconds(mats, rows, args.repeats)
            line = (
                f"| {formats} | {nbytes / 2**30:.2f} | {rows} | {s * 1e3:.1f} | {nbytes / s / 1e9:.1f} | "
                f"{nbytes / s / bandwidth:.2f} | {rows / s:.1f} |"
            )
            print(line, flush=True)
            lines.append(line)
        del mats
    if args.write:
        from results_file import write_lines  # benchmarks/results_file.py

        write_lines("Block formats", lines)


if __name__ == "__main__":
    main()
