"""Engine figures of the model runner and the paged KV cache (issue 11) on the default model.

    .venv/bin/python benchmarks/engine.py            # full run (~4 min on 2 cores), updates RESULTS.md
    .venv/bin/python benchmarks/engine.py --quick    # one repeat, RESULTS.md untouched

In-process server (`--adapter-slots 32 --max-rank 16`), SmolLM2-135M-Instruct in the dtype `auto` picks on
this machine, 32 rank-16 PEFT adapters on all seven linear layers (benchmarks/adapters.py writes them), all
through the real gRPC server. Figures, each a ratio measured in this one process:

(1) decode throughput, N = 1, 8, 32 concurrent GenerateStream calls, 32 new tokens (`ignore_eos`), base
    model vs N distinct adapters ("mixed"); tokens received / wall time, best of the repeats;
(2) prefill with many adapters: 32 concurrent 128-token prompts, 1 new token, on 32 distinct adapters vs on
    the base model (wall time of the whole burst; the CPU path must not pay a loop per adapter);
(3) time to first token of a 512-token prompt (1 new token, a prefix nobody has sent), and of a second
    prompt sharing its first 448 tokens (the prefix cache serves those); medians of 3 pairs;
(4) KV cache bytes per held token, and the cache's capacity at the default `--kv-cache-bytes`.

The side-by-side comparison with vLLM and llama.cpp is ../shared/peers/compare.py (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch
from results_file import RESULTS, write_section  # benchmarks/results_file.py
from serving import cpu_name  # benchmarks/serving.py

from adapters import chunks, peft_files, stream_all  # benchmarks/adapters.py
from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig
from hotlora.v1 import adapters_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc

NEW_TOKENS = 32
ADAPTERS = 32
TTFT_PROMPT = 512
TTFT_SHARED = 448


def decode_prompts(n: int) -> list[str]:
    return [f"Write a short note to customer number {i} about their order:" for i in range(n)]


def long_ids(tokenizer, n: int, seed: int) -> list[int]:
    """n token ids of ordinary text whose first tokens differ per seed (no earlier prefix can match)."""
    words = ["order", "river", "garden", "market", "letter", "window", "signal", "harbour", "pencil"]
    text = f"Record {seed}: " + " ".join(words[(seed * 7 + i * i) % len(words)] for i in range(4 * n))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n, "the generated text is too short"
    return ids[:n]


def ttft(stub, tokenizer, ids: list[int]) -> float:
    req = inference_pb2.GenerateRequest(
        prompt=tokenizer.decode(ids), params=common_pb2.SamplingParams(max_new_tokens=1, ignore_eos=True)
    )
    t0 = time.perf_counter()
    stub.Generate(req, timeout=600)
    return time.perf_counter() - t0


def shared_tokens(tokenizer, a: list[int], b: list[int]) -> int:
    """Tokens the server sees in common at the start of two prompts (they travel as text)."""
    x = tokenizer(tokenizer.decode(a), add_special_tokens=False)["input_ids"]
    y = tokenizer(tokenizer.decode(b), add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, RESULTS.md untouched")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure; default 2")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(os.cpu_count() or 1)
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="hotlora-bench-engine-") as tmp:
        config = ServerConfig(
            model="",
            port=0,
            metrics_port=-1,
            http_port=-1,  # no HTTP door: its default port may be taken
            data_dir=str(Path(tmp) / "data"),
            adapter_slots=ADAPTERS,
            max_rank=16,
            grace_seconds=2.0,
        )
        server = HotloraServer(config)
        server.start()
        server.load()
        loaded = server.state.loaded
        runner, tokenizer = loaded.model, loaded.tokenizer
        cfg = json.loads((Path(loaded.path) / "config.json").read_text())
        channel = grpc.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        stub = inference_pb2_grpc.InferenceStub(channel)
        astub = adapters_pb2_grpc.AdaptersStub(channel)
        names = [f"bench-{i}" for i in range(ADAPTERS)]
        for i, name in enumerate(names):
            astub.UploadAdapter(chunks(name, peft_files(cfg, seed=1000 + i)), timeout=300)
            astub.LoadAdapter(common_pb2.AdapterRef(name=name), timeout=120)
        rows: list[str] = []
        try:
            # warm-up: every adapter resident, thread pools up
            stream_all(stub, names, decode_prompts(ADAPTERS), 2)
            stream_all(stub, [""] * 8, decode_prompts(8), 2)

            # (1) decode throughput
            tput: dict[tuple[int, str], float] = {}
            for n in (1, 8, 32):
                for kind in ("base", "mixed"):
                    best = 0.0
                    for _ in range(repeats):
                        ads = [""] * n if kind == "base" else names[:n]
                        wall, toks = stream_all(stub, ads, decode_prompts(n), NEW_TOKENS)
                        best = max(best, toks / wall)
                    tput[(n, kind)] = best
                    print(f"(1) N={n:2d} {kind:5s}: {best:6.1f} tok/s", flush=True)
            for n in (1, 8, 32):
                base, mixed = tput[(n, "base")], tput[(n, "mixed")]
                rows.append(
                    f"| (1) decode, N={n}: base / {n} distinct adapters | {base:.1f} / {mixed:.1f} tok/s "
                    f"| mixed/base **{mixed / base:.2f}** | ≥ 0.75 at N=32 |"
                )

            # (2) prefill of 32 prompts on 32 distinct adapters vs on the base model
            prompts = [tokenizer.decode(long_ids(tokenizer, 128, 100 + i)) for i in range(ADAPTERS)]
            walls = {"base": [], "mixed": []}
            for r in range(repeats + 1):
                for kind in ("base", "mixed"):
                    # a new first word per round: the prefix cache must not serve a repeat
                    ps = [f"Round {r}{kind}. {p}" for p in prompts]
                    ads = [""] * ADAPTERS if kind == "base" else names
                    wall, _ = stream_all(stub, ads, ps, 1)
                    walls[kind].append(wall)
            base_s, mixed_s = min(walls["base"]), min(walls["mixed"])
            print(f"(2) prefill 32x128: base {base_s:.2f} s, 32 adapters {mixed_s:.2f} s", flush=True)
            rows.append(
                f"| (2) prefill of 32 prompts × 128 tokens: base / 32 distinct adapters | {base_s:.2f} / "
                f"{mixed_s:.2f} s | mixed/base time **{mixed_s / base_s:.2f}** | no loop per adapter "
                "(was ~2×) |"
            )

            # (3) time to first token, cold and with a shared 448-token prefix
            cold, warm, shared = [], [], []
            for trial in range(3 + 1):
                a = long_ids(tokenizer, TTFT_PROMPT, 10 * trial + 1)
                b = a[:TTFT_SHARED] + long_ids(tokenizer, TTFT_PROMPT - TTFT_SHARED, 10 * trial + 2)
                c, w = ttft(stub, tokenizer, a), ttft(stub, tokenizer, b)
                if trial:  # the first pair warms up
                    cold.append(c)
                    warm.append(w)
                    shared.append(shared_tokens(tokenizer, a, b))
            c, w = statistics.median(cold), statistics.median(warm)
            print(f"(3) TTFT 512: {c * 1000:.0f} ms; sharing {min(shared)} tokens: {w * 1000:.0f} ms")
            rows.append(
                f"| (3) time to first token, 512-token prompt / a second sharing its first {min(shared)} "
                f"tokens | {c * 1000:.0f} / {w * 1000:.0f} ms | **{w / c:.2f}** | second ≤ 0.3× first |"
            )

            # (4) KV memory
            kv = runner.kv_config
            per_token = runner.spec.kv_bytes_per_token * torch.empty(0, dtype=runner.dtype).element_size()
            rows.append(
                f"| (4) KV cache per held token ({runner.spec.num_layers} layers × K,V × "
                f"{runner.spec.num_kv_heads} heads × {runner.spec.head_dim}, {str(runner.dtype)[6:]}) | "
                f"{per_token:,} B | {kv.num_blocks:,} blocks × {kv.block_size} = "
                f"{kv.num_blocks * kv.block_size:,} tokens in {config.kv_cache_bytes / 2**30:.1f} GiB "
                "| reported |"
            )
            print(rows[-1])

        finally:
            channel.close()
            server.shutdown(grace=1.0)

    if args.quick:
        return
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    section = [
        "## Engine",
        "",
        f"Measured {now} on {machine} by `benchmarks/engine.py`; SmolLM2-135M-Instruct "
        f"{str(runner.dtype)[6:]} (`--dtype auto` on this CPU), in-process gRPC server, 32 rank-16 adapters "
        f"on all seven modules. Load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        "(the 2-core machine is shared: absolute figures move by tens of percent; the ratios are measured "
        "within one process). The clients run in the server's process and share its GIL, so decode tok/s "
        "here are below the peer kit's (a separate server process; *Engine vs peers*): compare those "
        "against peers, these only with each other.",
        "",
        "| figure | measured | ratio | goal |",
        "|---|---|---|---|",
        *rows,
    ]
    write_section("Engine", "\n".join(section) + "\n")
    print(f"wrote the Engine section of {RESULTS}")


if __name__ == "__main__":
    main()
