"""Adapter-serving figures (docs/design.md §6, figures 2 and 5) on the default model.
(Over 400 lines: four figures that share one loaded server and one set of written adapters.)

    .venv/bin/python benchmarks/adapters.py            # full run (~5 min on 2 cores), updates RESULTS.md
    .venv/bin/python benchmarks/adapters.py --quick    # one repeat, 200 registered, RESULTS.md untouched

SmolLM2-135M-Instruct fp32 on CPU, in-process server (`--adapter-slots 32 --max-rank 16`), 32 new tokens
per request, greedy, rank-16 LoRA on all seven linear layers (random A and small random B, written in
PEFT's format), distinct prompts. Tokens actually received are counted (a stream may end early on EOS).

(1) mixed-adapter throughput: N concurrent GenerateStream calls on N distinct adapters vs the same N
    streams on the base model alone, same server, N = 8 and 32 (adapters warmed into slots first);
(3) vs PEFT one request at a time (`set_adapter` per request, sequential, `generate`): measured on a few
    requests and extrapolated per request to N = 32 (sequential serving has constant per-request cost);
(4) cold adapter: UploadAdapter returning -> first GenerateStream chunk; and the host->device install
    time, read from the adapter cache's load observer ("device" tier), with the disk->host parse time;
(5) registered adapters from the working set (8) to 1000: N = 8 throughput on the same 8 adapters and the
    process RSS, before and after registering the rest as rank-1 single-module adapters (to keep disk
    and time bounded; registration cost does not depend on the adapter's size).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch
from concurrent_calls import concurrently, streamed_tokens  # benchmarks/concurrent_calls.py
from results_file import RESULTS, write_section  # benchmarks/results_file.py
from safetensors.torch import save as st_save

from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig, default_cache_dir
from hotlora.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
)

NEW_TOKENS = 32
RANK = 16
MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
TOPICS = [
    "a lighthouse",
    "a robot",
    "a river town",
    "a clockmaker",
    "a dragon",
    "a library",
    "a sailor",
    "a mountain",
    "Paris",
    "a caravan",
    "a garden",
    "the moon",
    "a violin",
    "a storm",
    "a bakery",
    "a train",
    "a forest",
    "a detective",
    "an island",
    "a castle",
    "a comet",
    "a market",
    "a fox",
    "a glacier",
    "a chess game",
    "a volcano",
    "a harbor",
    "a kite",
    "a desert",
    "a lantern",
    "a museum",
    "a whale",
]


# ---- adapters in PEFT format -------------------------------------------------------------------------


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    q = cfg["num_attention_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def peft_files(
    cfg: dict, seed: int, rank: int = RANK, modules=tuple(MODULES), layers=None, dtype=torch.float32
) -> dict[str, bytes]:
    """adapter_config.json + adapter_model.safetensors exactly as PEFT's save_pretrained lays them out
    (tensors in `dtype`)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(cfg)
    layers = range(cfg["num_hidden_layers"]) if layers is None else layers
    tensors = {}
    for i in layers:
        for m in modules:
            in_f, out_f = shapes[m]
            key = f"base_model.model.model.layers.{i}.{MODULES[m]}.{m}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).to(dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "layers_to_transform": None if len(layers) == cfg["num_hidden_layers"] else list(layers),
    }
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": st_save(tensors, metadata={"format": "pt"}),
    }


def chunks(name: str, files: dict[str, bytes], size: int = 1 << 20):
    yield adapters_pb2.UploadChunk(name=name)
    for fname, data in files.items():
        for off in range(0, len(data), size):
            yield adapters_pb2.UploadChunk(filename=fname, data=data[off : off + size])


def write_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        (path / k).write_bytes(v)
    return path


# ---- measurements ------------------------------------------------------------------------------------


class LoadTimes:
    """Wraps the cache's observer to record load seconds per tier."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds: dict[str, list[float]] = {"host": [], "device": []}

    def adapter_load_seconds(self, tier, seconds):
        self.seconds.setdefault(tier, []).append(seconds)
        if self.inner is not None:
            self.inner.adapter_load_seconds(tier, seconds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt(i: int) -> str:
    return f"Write one sentence about {TOPICS[i % len(TOPICS)]}."


def stream_all(stub, adapters: list[str], prompts: list[str], new_tokens: int) -> tuple[float, int]:
    """One GenerateStream per adapter ("" = base), all at once; (wall seconds, tokens received)."""

    def one(i: int) -> int:
        req = inference_pb2.GenerateRequest(
            prompt=prompts[i],
            adapter=adapters[i],
            params=common_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
        )
        return streamed_tokens(stub.GenerateStream(req, timeout=600))

    return concurrently(one, len(adapters))


def run_streams(stub, adapters: list[str]) -> float:
    """All streams at once; returns aggregate tokens/s (tokens received / wall time)."""
    wall, tokens = stream_all(stub, adapters, [prompt(i) for i in range(len(adapters))], NEW_TOKENS)
    return tokens / wall


def best_of(fn, repeats: int) -> float:
    return max(fn() for _ in range(repeats))


def peft_sequential(model_dir: Path, adapter_dirs: list[Path], requests: int) -> tuple[float, int]:
    """PEFT serving one request at a time with set_adapter; returns (tokens/s, requests measured)."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="a0").eval()
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    tokens = 0
    with torch.no_grad():
        ids = tok(prompt(0), return_tensors="pt")["input_ids"]
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        for r in range(requests):
            model.set_adapter(f"a{r % len(adapter_dirs)}")
            ids = tok(prompt(r), return_tensors="pt")["input_ids"]
            out = model.generate(
                input_ids=ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
            tokens += out.shape[1] - ids.shape[1]
        wall = time.perf_counter() - t0
    del model, base
    return tokens / wall, requests


def first_token_seconds(stub, req) -> float:
    """Seconds from sending `req` as a GenerateStream to its first chunk."""
    t0 = time.perf_counter()
    for _ in stub.GenerateStream(req, timeout=120):
        break
    return time.perf_counter() - t0


def cold_start(adapters_stub, stub, cfg: dict, trials: int) -> list[float]:
    """Seconds from UploadAdapter returning to the first GenerateStream chunk, per trial."""
    out = []
    for k in range(trials):
        files = peft_files(cfg, seed=9000 + k)
        name = f"cold-{k}"
        adapters_stub.UploadAdapter(chunks(name, files), timeout=120)
        out.append(first_token_seconds(stub, first_token_request(k, name)))
    return out


def warm_first_token(stub, adapter: str, trials: int) -> list[float]:
    return [first_token_seconds(stub, first_token_request(k, adapter)) for k in range(trials)]


def first_token_request(k: int, adapter: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt=prompt(k), adapter=adapter, params=common_pb2.SamplingParams(max_new_tokens=1)
    )


# ---- report ------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_results(section: str) -> None:
    write_section("Adapters", section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, 200 registered, RESULTS.md untouched")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (best kept); default 2")
    ap.add_argument("--registered", type=int, default=None, help="adapters registered in (5); default 1000")
    ap.add_argument("--peft-requests", type=int, default=6, help="PEFT requests measured for (3)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    registered = args.registered or (200 if args.quick else 1000)
    torch.set_num_threads(os.cpu_count() or 1)
    load_start = os.getloadavg()
    started = datetime.datetime.now()

    from hotlora.server.model_loading import prepare_default_model

    model_dir = prepare_default_model(default_cache_dir())
    cfg = json.loads((model_dir / "config.json").read_text())
    rows: list[tuple[str, str, str, str]] = []  # figure, value, ratio, goal
    with tempfile.TemporaryDirectory(prefix="hotlora-bench-adapters-") as tmp:
        tmp = Path(tmp)
        print("writing 32 rank-16 adapters ...", flush=True)
        adapter_files = [peft_files(cfg, seed=i) for i in range(32)]
        mib = len(adapter_files[0]["adapter_model.safetensors"]) / (1 << 20)
        config = ServerConfig(
            model="",
            port=0,
            metrics_port=-1,
            http_port=-1,
            data_dir=str(tmp / "data"),
            adapter_slots=32,
            max_rank=RANK,
            max_adapters_per_tenant=registered + 100,
            grace_seconds=2.0,
        )
        server = HotloraServer(config)
        server.start()
        server.load()
        channel = grpc.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        stub = inference_pb2_grpc.InferenceStub(channel)
        astub = adapters_pb2_grpc.AdaptersStub(channel)
        cache = server.state.adapters.cache
        loads = LoadTimes(cache.observer)
        cache.observer = loads
        try:
            t0 = time.perf_counter()
            for i, files in enumerate(adapter_files):
                astub.UploadAdapter(chunks(f"bench-{i}", files), timeout=300)
            upload_s = (time.perf_counter() - t0) / len(adapter_files)
            for i in range(32):
                astub.LoadAdapter(common_pb2.AdapterRef(name=f"bench-{i}"), timeout=120)
            run_streams(stub, [f"bench-{i}" for i in range(8)])  # warm-up
            # (1) mixed adapters vs base, same server
            mixed = {}
            for n in (8, 32):
                names = [f"bench-{i}" for i in range(n)]
                ad = best_of(lambda names=names: run_streams(stub, names), repeats)
                base = best_of(lambda n=n: run_streams(stub, [""] * n), repeats)
                mixed[n] = (ad, base)
                print(
                    f"(1) N={n}: {n} adapters {ad:.1f} tok/s, base {base:.1f} tok/s, ratio {ad / base:.2f}",
                    flush=True,
                )
                rows.append(
                    (
                        f"(1) mixed-adapter throughput, N={n} ({n} distinct adapters vs base only)",
                        f"{ad:.1f} vs {base:.1f} tok/s",
                        f"**{ad / base:.2f}**",
                        "≥ 0.9 at N=32 (PEFT mixed batch: 0.43 / 0.25)",
                    )
                )

            # (4) cold adapter; load times
            host_before = len(loads.seconds.get("host", []))
            dev_before = len(loads.seconds.get("device", []))
            cold = cold_start(astub, stub, cfg, trials=3)
            warm = warm_first_token(stub, "bench-0", trials=3)
            host_s = loads.seconds["host"][host_before:]
            dev_s = loads.seconds["device"][dev_before:]
            all_dev = loads.seconds["device"]
            ms = lambda xs, d=0: ", ".join(f"{x * 1000:.{d}f}" for x in xs)
            print(f"(4) cold first token [{ms(cold)}] ms; warm [{ms(warm)}] ms", flush=True)
            print(f"(4) host load [{ms(host_s)}] ms; device install [{ms(dev_s, 1)}] ms", flush=True)
            rows.append(
                (
                    "(4) cold adapter: upload returned → first token (median of 3)",
                    f"{statistics.median(cold) * 1000:.0f} ms (warm adapter: "
                    f"{statistics.median(warm) * 1000:.0f} ms)",
                    "",
                    "< 50 ms",
                )
            )
            rows.append(
                (
                    "(4) host→device install (cache observer, median of all installs)",
                    f"{statistics.median(all_dev) * 1000:.1f} ms ({len(all_dev)} installs)",
                    "",
                    "< 50 ms (LoRAX 0.5–1 s)",
                )
            )
            if host_s:  # uploads seed the host tier, so a fresh upload may need no disk load at all
                rows.append(
                    (
                        "(4) disk→host load + validation of a cold rank-16 adapter (median)",
                        f"{statistics.median(host_s) * 1000:.0f} ms ({mib:.1f} MiB)",
                        "",
                        "(part of the above)",
                    )
                )

            # (3) vs PEFT one at a time
            dirs = [write_dir(tmp / f"peft-{i}", adapter_files[i]) for i in range(4)]
            peft_tps, n_req = peft_sequential(model_dir, dirs, args.peft_requests)
            ours = mixed[32][0]
            print(
                f"(3) PEFT sequential {peft_tps:.1f} tok/s over {n_req} requests; hotlora N=32 {ours:.1f} "
                f"tok/s: {ours / peft_tps:.1f}x",
                flush=True,
            )
            rows.append(
                (
                    f"(3) vs PEFT set_adapter, one request at a time (PEFT measured on {n_req} requests, "
                    "per-request rate extrapolated to 32)",
                    f"{ours:.1f} vs {peft_tps:.1f} tok/s",
                    f"**{ours / peft_tps:.1f}×**",
                    "≥ 12× at N=32",
                )
            )

            # (5) working set 8, registered 1 -> `registered`
            ws = [f"bench-{i}" for i in range(8)]
            for name in [f"bench-{i}" for i in range(8, 32)] + [f"cold-{k}" for k in range(3)]:
                astub.DeleteAdapter(common_pb2.AdapterRef(name=name), timeout=60)
            before_n = len(astub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=60).adapters)
            rss0 = rss_mib()
            tps0 = best_of(lambda: run_streams(stub, ws), repeats)
            small = peft_files(cfg, seed=5, rank=1, modules=("q_proj",), layers=[0])
            t0 = time.perf_counter()
            for k in range(registered - before_n):
                astub.UploadAdapter(chunks(f"many-{k:04d}", small), timeout=60)
            reg_s = time.perf_counter() - t0
            after_n = len(astub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=60).adapters)
            tps1 = best_of(lambda: run_streams(stub, ws), repeats)
            rss1 = rss_mib()
            bytes_per = sum(len(v) for v in small.values())
            print(
                f"(5) {before_n} -> {after_n} registered: {tps0:.1f} -> {tps1:.1f} tok/s; RSS {rss0:.0f} -> "
                f"{rss1:.0f} MiB; {reg_s / max(1, after_n - before_n) * 1000:.1f} ms per registration",
                flush=True,
            )
            rows.append(
                (
                    f"(5) registered {before_n} → {after_n} (working set 8, N=8): throughput",
                    f"{tps0:.1f} → {tps1:.1f} tok/s",
                    f"**{tps1 / tps0 - 1:+.1%}**",
                    "drop ≤ 5%",
                )
            )
            rows.append(
                (
                    f"(5) registered {before_n} → {after_n}: process RSS",
                    f"{rss0:.0f} → {rss1:.0f} MiB ({rss1 - rss0:+.1f} MiB)",
                    f"{(rss1 - rss0) * (1 << 20) / max(1, after_n - before_n):.0f} B/adapter",
                    f"adapter bytes only ({bytes_per} B files each, stored on disk, not in memory)",
                )
            )
        finally:
            channel.close()
            server.shutdown(grace=1.0)
    load_end = os.getloadavg()

    table = ["| figure | measured | ratio | goal |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    print("\n" + "\n".join(table))
    notes = " ".join(
        [
            "SmolLM2-135M-Instruct fp32, in-process server (`--adapter-slots 32 --max-rank 16`),",
            f"{NEW_TOKENS} new tokens per request, greedy, rank-16 LoRA on all seven linear layers",
            f"({mib:.1f} MiB each), distinct prompts; tokens/s count tokens received over wall time;",
            f"best of {repeats} runs. Upload of one rank-16 adapter over gRPC: {upload_s * 1000:.0f} ms.",
            "For (5) the extra adapters are rank-1 on one module of one layer (registration cost does",
            f"not depend on size). Load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end:",
            "the 2-core machine is shared with other jobs, so absolute tokens/s move between runs;",
            "the ratios are measured in one process minutes apart.",
        ]
    )
    section = "\n".join(
        [
            "## Adapters",
            "",
            f"Measured {started:%Y-%m-%d %H:%M} on {machine()} by `benchmarks/adapters.py`"
            + (" --quick" if args.quick else "")
            + ".",
            "",
            notes,
            "",
            *table,
            "",
        ]
    )
    if args.quick:
        print("\n(--quick: RESULTS.md not updated)")
    else:
        write_results(section)
        print(f"\nwrote the Adapters section of {RESULTS}")


if __name__ == "__main__":
    main()
