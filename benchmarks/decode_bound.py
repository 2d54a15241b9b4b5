"""One-stream decode against the memory's bound: the bytes a decode step of the default model reads as the
server stores it, what this machine's memory streams, the tokens/s those allow, and measured rates as a
fraction of that bound.

    .venv/bin/python benchmarks/decode_bound.py [--threads N] [--kit OUT.json ...] [--context 32]

Bytes a one-stream step reads: every matrix as the server keeps it (`Runner.w.nbytes` under the server's
default precision: the default model's GGUF blocks; its LM head is the embedding, read whole for the
logits), plus the KV cache up to `--context` positions (a kit request: a ~15-token prompt and 32 new tokens).
An untied embedding would read one row a step; it is counted whole here, so the bound is never overstated.
The memory's rate: torch summing 1 GiB of cold fp32 tensors on its threads (decode_attention.stream_rate).
`--kit`: peer-kit OUT_JSON files (compare.py: each system's N=1 base tok/s) or benchmarks/cpu_per_token.py
--json files (tokens per CPU second on one thread: compare with `--threads 1`), each rate printed with its
fraction of the bound (llama.cpp's Q4_1 reads about the same bytes: the same blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from decode_attention import stream_rate  # benchmarks/decode_attention.py

from hotlora.server.config import default_cache_dir
from hotlora.server.model_loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", nargs="*", default=[], help="compare.py OUT_JSON files")
    parser.add_argument("--context", type=int, default=32, help="KV positions a step reads (mean)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads reading (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("", default_cache_dir(), device="cpu", kv_cache_bytes=64 << 20)
    runner = loaded.model
    weights = runner.w.nbytes
    kv = runner.spec.kv_bytes_per_token * runner.dtype.itemsize * args.context
    per_token = weights + kv
    rate = stream_rate(1 << 30, args.repeats)
    bound = rate / per_token
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"precision: {loaded.precision.describe()}")
    print(
        f"bytes a one-stream decode step reads: {weights / 2**20:.1f} MiB of weights + {kv / 2**20:.1f} MiB "
        f"of KV ({args.context} positions) = {per_token / 1e6:.1f} MB"
    )
    print(f"memory stream rate: {rate / 1e9:.1f} GB/s -> bound {bound:.0f} tok/s at one stream")
    for path in args.kit:
        with open(path) as f:
            run = json.load(f)
        name = os.path.basename(path)
        if isinstance(run, list):  # cpu_per_token.py: tokens per CPU second, one thread
            for row in run:
                per_s = row["tokens_per_cpu_s"]
                print(
                    f"{name} (load {row['loadavg']:.2f}): {row['system']} {row['kind']} {per_s:.1f} tokens "
                    f"per CPU second = {per_s / bound:.2f} of the bound"
                )
            continue
        load = run["machine"]["loadavg_at_start"][0]
        for row in run["throughput"]:
            if row["n"] == 1:
                print(
                    f"{name} (load {load:.2f}): {row['system']} N=1 base "
                    f"{row['base_tok_s']:.1f} tok/s = {row['base_tok_s'] / bound:.2f} of the bound"
                )


if __name__ == "__main__":
    main()
