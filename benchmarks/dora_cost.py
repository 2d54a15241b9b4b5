"""DoRA's serving cost against LoRA of the same rank (goal: DoRA step cost / LoRA step cost <= 1.15 at N=32).

The peer kit's workload (/work/shared/peers/README.md): the default model (SmolLM2-135M-Instruct), rank-16
adapters on all seven linear layers, N = 32 concurrent streams on 32 distinct adapters, 32 new tokens each,
greedy, ignore_eos; tok/s = tokens received / wall time. One in-process server holds 32 LoRA adapters and the
same 32 (same A and B) as DoRA adapters with a magnitude vector (64 slots, all warmed first); runs alternate
LoRA / DoRA so the machine's load moves both alike. Step cost ratio = LoRA tok/s / DoRA tok/s (same tokens).
Also the install time of a DoRA adapter into a slot (its norms are computed there, once) vs a LoRA one.

    .venv/bin/python benchmarks/dora_cost.py [--repeats 3] [--n 32] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
from pathlib import Path

import grpc
import torch
from results_file import write_lines
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters import RANK, LoadTimes, chunks, machine, peft_files, run_streams
from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig, default_cache_dir
from hotlora.v1 import adapters_pb2_grpc, common_pb2, inference_pb2_grpc


def dora_files(lora: dict[str, bytes], seed: int, norms: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The same adapter with use_dora and a magnitude vector near the base rows' norms (as PEFT
    initialises it, then moved by training)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(st_load(lora["adapter_model.safetensors"]))
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        module = key.removesuffix(".lora_B.weight")
        base = norms[module.removeprefix("base_model.model.")]
        tensors[f"{module}.lora_magnitude_vector"] = base * (
            1 + 0.05 * torch.randn(base.shape, generator=gen)
        )
    config = json.loads(lora["adapter_config.json"])
    config["use_dora"] = True
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": st_save(tensors, metadata={"format": "pt"}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    n = args.n
    torch.set_num_threads(os.cpu_count() or 1)
    from safetensors.torch import load_file

    from hotlora.server.model_loading import prepare_default_model

    model_dir = prepare_default_model(default_cache_dir())
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = {}
    for f in model_dir.glob("*.safetensors"):
        weights.update(load_file(f))
    norms = {
        k.removesuffix(".weight"): torch.linalg.norm(v.float(), dim=1)
        for k, v in weights.items()
        if v.dim() == 2
    }
    del weights
    lora = [peft_files(cfg, seed=i) for i in range(n)]
    dora = [dora_files(f, 100 + i, norms) for i, f in enumerate(lora)]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hotlora-bench-dora-") as tmp:
        config = ServerConfig(
            model="", port=0, metrics_port=-1, http_port=-1, data_dir=str(Path(tmp) / "data"),
            adapter_slots=2 * n, max_rank=RANK, grace_seconds=2.0,
        )  # fmt: skip
        server = HotloraServer(config)
        server.start()
        server.load()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub, astub = inference_pb2_grpc.InferenceStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        cache = server.state.adapters.cache
        loads = LoadTimes(cache.observer)
        cache.observer = loads
        try:
            installs = {}
            for kind, files in (("lora", lora), ("dora", dora)):
                for i, f in enumerate(files):
                    astub.UploadAdapter(chunks(f"{kind}-{i}", f), timeout=300)
                loads.seconds["device"].clear()
                for i in range(n):
                    astub.LoadAdapter(common_pb2.AdapterRef(name=f"{kind}-{i}"), timeout=300)
                installs[kind] = statistics.median(loads.seconds["device"])
            names = {k: [f"{k}-{i}" for i in range(n)] for k in ("lora", "dora")}
            run_streams(stub, names["lora"][:8])  # warm-up
            run_streams(stub, names["dora"][:8])
            rates = {"lora": [], "dora": []}
            for _ in range(args.repeats):
                for kind in ("lora", "dora"):
                    rates[kind].append(run_streams(stub, names[kind]))
                    print(f"{kind}: {rates[kind][-1]:.1f} tok/s", flush=True)
        finally:
            channel.close()
            server.shutdown(grace=1.0)
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["lora"] / best["dora"]
    per_run = [a / b for a, b in zip(rates["lora"], rates["dora"], strict=True)]
    lines = [
        f"{datetime.date.today()}, {machine()}, load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end; "
        f"`benchmarks/dora_cost.py --repeats {args.repeats} --n {n}`",
        "",
        f"N={n} streams on {n} distinct rank-{RANK} adapters (all seven linears), 32 new tokens, "
        "greedy, the server's default flags (--dtype auto):",
        "",
        "| LoRA tok/s (best) | DoRA tok/s (best) | DoRA step cost / LoRA (goal <= 1.15) | "
        "per alternating run | install into a slot, LoRA / DoRA (median) |",
        "|---|---|---|---|---|",
        f"| {best['lora']:.1f} | {best['dora']:.1f} | {ratio:.3f} | "
        f"{', '.join(f'{r:.3f}' for r in per_run)} | "
        f"{installs['lora'] * 1e3:.1f} ms / {installs['dora'] * 1e3:.1f} ms |",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_lines("DoRA cost", lines)


if __name__ == "__main__":
    main()
