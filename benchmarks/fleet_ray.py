"""Fleet on Ray Serve: affinity hit rate and throughput of 2 replicas vs 1, through Ray Serve's gRPC proxy.

PostgreSQL + S3 (moto) are started here on loopback; 8 rank-16 adapters on all seven linear layers of the
served model are registered in them; then for 1 and for 2 replicas: N Generate requests spread over the
8 adapters from 8 concurrent clients, `--new-tokens` each (greedy). Figures:

- throughput (completion tokens / wall time) with 1 and 2 replicas, and their ratio;
- affinity hit rate: the share of requests that found their adapter already loaded on the replica they
  were routed to (1 - adapter loads / requests);
- loads per adapter per replica (max).

    .venv/bin/python benchmarks/fleet_ray.py [--requests 160] [--new-tokens 16] [--model DIR]

Without --model: the default SmolLM2-135M-Instruct (dequantized once into the per-user cache). On a
2-core machine two replicas share the same cores: expect no speed-up; the figure is that nothing is
lost and loads stay bounded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKEN = "bench"
ADAPTERS = 8


def _adapters(model_dir: Path, out: Path) -> list[dict[str, bytes]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    files = []
    for i in range(ADAPTERS):
        base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        model.save_pretrained(out / f"a{i}")
        files.append({p.name: p.read_bytes() for p in (out / f"a{i}").iterdir() if p.is_file()})
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--model", default="")
    args = ap.parse_args()

    import grpc
    import ray
    from ray import serve
    from transformers import AutoConfig, AutoModelForCausalLM

    from hotlora.adapters.base_model_info import BaseModelInfo
    from hotlora.adapters.peft.format import AdapterLimits, parse_peft_adapter
    from hotlora.adapters.store.s3_blob_store import S3Options
    from hotlora.adapters.store.shared_stores import StoreConfig, open_registry
    from hotlora.server.config import ServerConfig, default_cache_dir
    from hotlora.server.fleet.app import APP_NAME, FleetConfig, start_serve
    from hotlora.server.model_loading import prepare_default_model
    from hotlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    from tests.fleet_stores import S3_ENV, SharedStores, free_port, postgres_server, s3_server

    os.environ.update(S3_ENV)
    model_dir = Path(args.model) if args.model else prepare_default_model(default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter_files = _adapters(model_dir, tmp / "peft")
        base = BaseModelInfo.from_model(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        )
        tokens = tmp / "tokens"
        tokens.write_text(f"bench {TOKEN}\n")
        with postgres_server(tmp / "pg") as pg, s3_server(tmp) as s3:
            stores = SharedStores(pg.new_database(), f"s3://{s3.new_bucket()}/fleet", s3.endpoint)
            reg = open_registry(
                StoreConfig(tmp / "up", registry=stores.registry, blob_store=stores.blob_store,
                            s3=S3Options(endpoint_url=stores.endpoint), replica_id="bench")
            )  # fmt: skip
            limits = AdapterLimits(max_rank=64)
            names = [
                reg.commit("bench", f"bot-{i}", f, parse_peft_adapter(f, base, limits)).name
                for i, f in enumerate(adapter_files)
            ]
            reg.close()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            rows = []
            try:
                for replicas in (1, 2):
                    cfg = ServerConfig(
                        model=str(model_dir), data_dir=str(tmp / f"r{replicas}"), tokens_file=str(tokens),
                        device="cpu", max_rpcs_per_tenant=64, adapter_slots=8, **stores.server_flags(),
                    )  # fmt: skip
                    port = free_port()
                    start_serve(FleetConfig(cfg, replicas, 2.0 / replicas, ADAPTERS, port, free_port()))
                    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
                    stub = inference_pb2_grpc.InferenceStub(channel)
                    md = (("authorization", f"Bearer {TOKEN}"),)

                    def one(i, stub=stub, md=md):
                        req = inference_pb2.GenerateRequest(
                            prompt=f"Write a line about the number {i}.", adapter=names[i % ADAPTERS],
                            params=common_pb2.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True),
                        )  # fmt: skip
                        for attempt in range(6):
                            try:
                                return stub.Generate(req, metadata=md, timeout=300).usage.completion_tokens
                            except grpc.RpcError as err:
                                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 5:
                                    raise
                                time.sleep(0.5 * 2**attempt)

                    one(0)  # the application answers
                    with concurrent.futures.ThreadPoolExecutor(8) as pool:
                        t0 = time.monotonic()
                        produced = sum(pool.map(one, range(args.requests)))
                        wall = time.monotonic() - t0
                    handle = serve.get_deployment_handle("HotloraReplica", app_name=APP_NAME)
                    seen = {}
                    while len(seen) < replicas:
                        rid, counts = handle.load_counts.remote().result(timeout_s=60)
                        seen[rid] = counts
                    loads = [n for c in seen.values() for n in c.values()]
                    rows.append((replicas, produced / wall, 1 - sum(loads) / (args.requests + 1), max(loads)))
                    channel.close()
                    serve.shutdown()
            finally:
                serve.shutdown()
                ray.shutdown()
    print(
        f"fleet on Ray Serve: {args.requests} requests over {ADAPTERS} rank-16 adapters, {args.new_tokens} "
        f"new tokens each, 8 clients, model {model_dir.name}; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} (shared machine)"
    )
    print("| replicas | tok/s | affinity hit rate | max loads per adapter per replica |")
    print("|---|---|---|---|")
    for replicas, tps, hit, worst in rows:
        print(f"| {replicas} | {tps:.1f} | {hit:.3f} | {worst} |")
    print(f"2 vs 1 replica throughput: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
