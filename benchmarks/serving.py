"""Serving-core figures (docs/design.md §6, figure 2, and the start-up time) on the default model.

    .venv/bin/python benchmarks/serving.py            # full run (< 5 min on 2 cores), updates RESULTS.md
    .venv/bin/python benchmarks/serving.py --quick    # one repeat, no cold start, RESULTS.md untouched

(a) time to ready: the in-process server's `load()` with a fresh, empty --cache-dir (the GGUF is
    dequantized) and again with that cache filled;
(b) aggregate decode tokens/s of 1, 8 and 32 concurrent GenerateStream calls through the real gRPC server
    (distinct prompts, 32 new tokens, greedy; tokens actually received are counted);
(c) engine efficiency: (b) at 32 streams vs transformers `model.generate` on one static left-padded batch
    of the same 32 prompts (same max_new_tokens, greedy), in the same process.

Writes the figures, with date and machine, into the ``## Serving core`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import grpc
import torch
from concurrent_calls import concurrently, streamed_tokens  # benchmarks/concurrent_calls.py
from results_file import RESULTS, write_section  # benchmarks/results_file.py

from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig, default_cache_dir
from hotlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

NEW_TOKENS = 32
STREAMS = (1, 8, 32)
TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "the river town",
    "a clockmaker",
    "the last dragon",
    "a quiet library",
    "an old sailor",
    "the mountain pass",
    "a painter in Paris",
    "the desert caravan",
    "a tiny garden",
    "the winter market",
    "a young astronomer",
    "the abandoned mill",
    "a travelling circus",
    "the forest spirit",
    "a baker at dawn",
    "the island school",
    "a retired detective",
    "the glass tower",
    "a stray cat",
    "the midnight train",
    "a village doctor",
    "the frozen lake",
    "a street musician",
    "the copper mine",
    "a kite maker",
    "the harbour festival",
    "a forgetful wizard",
    "the salt flats",
    "a beekeeper",
    "the night ferry",
]
PROMPTS = [f"Here is a long story about {t}. It begins on a cold morning, when" for t in TOPICS]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- (a) time to ready -------------------------------------------------------------------


def time_to_ready(cache_dir: str, data_dir: str) -> tuple[float, HotloraServer]:
    cfg = ServerConfig(
        port=0, metrics_port=-1, http_port=-1, data_dir=data_dir, cache_dir=cache_dir, grace_seconds=1.0
    )
    server = HotloraServer(cfg)
    server.start()
    t0 = time.perf_counter()
    server.load()
    return time.perf_counter() - t0, server


# ---- (b) concurrent streams ----------------------------------------------------------------


def run_streams(stub, prompts: list[str]) -> tuple[float, int]:
    """All prompts as concurrent GenerateStream calls; (seconds, tokens received)."""

    def one(i: int) -> int:
        req = inference_pb2.GenerateRequest(
            prompt=prompts[i],
            params=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
        )
        return streamed_tokens(stub.GenerateStream(req, timeout=600))

    return concurrently(one, len(prompts))


# ---- (c) transformers static batch -------------------------------------------------------


def hf_static_batch(model, tokenizer, prompts: list[str]) -> tuple[float, int]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - t0
    tokens = 0
    for row in out[:, enc["input_ids"].shape[1] :].tolist():  # real tokens: up to and including the first EOS
        tokens += row.index(eos) + 1 if eos in row else len(row)
    return seconds, tokens


# ---- report -----------------------------------------------------------------------------


def write_results(section: str) -> None:
    write_section("Serving core", section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="one repeat, skip the cold start, do not write RESULTS.md"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (best kept); default 3")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="hotlora-bench-") as tmp:
        cold = None
        if not args.quick:
            cold, server = time_to_ready(str(Path(tmp) / "cold-cache"), str(Path(tmp) / "data-cold"))
            server.shutdown(grace=0.5)
            warm_cache = str(Path(tmp) / "cold-cache")
        else:
            warm_cache = default_cache_dir()
        warm, server = time_to_ready(warm_cache, str(Path(tmp) / "data"))
        if not args.quick:  # best of two: the machine's load moves these by seconds
            server.shutdown(grace=0.5)
            again, server = time_to_ready(warm_cache, str(Path(tmp) / "data2"))
            warm = min(warm, again)
        print(
            f"time to ready: cold cache {cold and f'{cold:.1f} s' or 'skipped (--quick)'}, warm {warm:.2f} s"
        )

        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = inference_pb2_grpc.InferenceStub(channel)
        model, tokenizer = server.state.loaded.model, server.state.loaded.tokenizer
        run_streams(stub, PROMPTS[:8])  # warm-up: first forward passes, thread pools
        hf_static_batch(model, tokenizer, PROMPTS[:4])
        tput: dict[int, float] = {n: 0.0 for n in STREAMS}
        hf = 0.0
        paired: list[float] = []  # server/transformers of back-to-back runs: robust to load drift

        def server_run(n: int) -> float:
            seconds, tokens = run_streams(stub, PROMPTS[:n])
            tput[n] = max(tput[n], tokens / seconds)
            print(
                f"  server {n:2d} streams: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s"
            )
            return tokens / seconds

        for n in STREAMS[:-1]:
            for _ in range(repeats):
                server_run(n)
        # the 32-stream server run and the transformers batch alternate (the engine idles meanwhile),
        # so a change in machine load hits both sides of the efficiency ratio alike
        for _ in range(repeats):
            mine = server_run(32)
            seconds, tokens = hf_static_batch(model, tokenizer, PROMPTS[:32])
            hf = max(hf, tokens / seconds)
            paired.append(mine / (tokens / seconds))
            print(
                f"  transformers generate, static batch of 32: {tokens} tokens in {seconds:.2f} s "
                f"= {tokens / seconds:.1f} tok/s"
            )
        channel.close()
        server.shutdown(grace=0.5)

    rows = [
        ("server, 1 stream", tput[1], tput[1] / tput[1]),
        ("server, 8 concurrent streams", tput[8], tput[8] / tput[1]),
        ("server, 32 concurrent streams", tput[32], tput[32] / tput[1]),
        ("transformers `generate`, one static batch of 32", hf, hf / tput[1]),
    ]
    efficiency = tput[32] / hf
    pairs = ", ".join(f"{r:.2f}" for r in paired)
    load = os.getloadavg()[0]
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    table = ["| what | tok/s | vs 1 stream |", "|---|---|---|"]
    table += [f"| {name} | {v:.1f} | {r:.2f}× |" for name, v, r in rows]
    print()
    print("\n".join(table))
    print(
        f"\nengine efficiency (server 32 streams / transformers static batch 32): {efficiency:.2f}"
        f" (goal ≥ 1.0); back-to-back pairs: {pairs}"
    )

    if args.quick:
        return
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = "\n".join([
        "## Serving core",
        "",
        f"Measured {now} on {machine} by `benchmarks/serving.py`.",
        "",
        f"SmolLM2-135M-Instruct, float32, CPU; {NEW_TOKENS} new tokens per request, greedy, distinct",
        "prompts; tokens counted as received (a stream that meets EOS early counts only what it produced).",
        "Streams are concurrent GenerateStream calls through the real gRPC server; best of "
        f"{repeats} runs each (load average at the end: {load:.1f}; the machine is shared with other jobs).",
        "",
        "Time to ready (server `load()`): first start with an empty cache (GGUF dequantized) "
        f"**{cold:.1f} s**; "
        f"later start **{warm:.2f} s**.",
        "",
        *table,
        "",
        f"32-stream / 1-stream scaling: **{tput[32] / tput[1]:.2f}×**. "
        "Engine efficiency (docs/design.md §6, figure 2, server "
        f"32 streams / transformers static batch of the same 32 prompts): **{efficiency:.2f}** (goal ≥ 1.0);",
        f"each back-to-back pair of runs: {pairs}.",
        "",
    ])  # fmt: skip
    write_results(section)
    print(f"wrote the Serving core section of {RESULTS}")


if __name__ == "__main__":
    main()
