"""Fleet figures (docs/design.md §7): two `hotlora serve` replicas on one PostgreSQL + S3 (started here, on
loopback, like the tests), timed through their gRPC ports:

- upload on A -> servable on B: from UploadAdapter's reply on A to B's first Generate with the adapter;
- delete on A -> NOT_FOUND on B: from DeleteAdapter's reply on A to B's first NOT_FOUND (B polling);
- unload on A -> evicted on B: from UnloadAdapter's reply on A to B reporting the version STORED
  (the LISTEN/NOTIFY path; the two above are the per-request resolution against PostgreSQL).

    .venv/bin/python benchmarks/fleet.py [--trials 10] [--model DIR]

Without --model the replicas serve a tiny random Llama (the figures are about the registry, not the model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _until(fn, limit_s: float = 10.0) -> float:
    t0 = time.monotonic()
    while not fn():
        if time.monotonic() - t0 > limit_s:
            raise RuntimeError(f"not reached in {limit_s} s")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--model", default="")
    args = ap.parse_args()

    import os

    from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
    from tests.fleet.replicas import Replica
    from tests.fleet_stores import S3_ENV, SharedStores, postgres_server, s3_server
    from tests.server.adapter_utils import make_peft_adapter, upload_chunks
    from tests.tiny import save_tiny_model_dir

    os.environ.update(S3_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else save_tiny_model_dir(tmp / "model")
        adapter = make_peft_adapter(
            tmp / "peft", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        )
        with postgres_server(tmp / "pg") as pg, s3_server(tmp) as s3:
            stores = SharedStores(pg.new_database(), f"s3://{s3.new_bucket()}/fleet", s3.endpoint)
            a = Replica(model, tmp / "a", stores, name="a")
            b = Replica(model, tmp / "b", stores, name="b")
            servable, deleted, unloaded = [], [], []
            try:
                for i in range(args.trials):
                    name = f"bench-{i}"
                    ref = common_pb2.AdapterRef(name=name)
                    req = inference_pb2.GenerateRequest(
                        prompt="hello", adapter=name, params=common_pb2.SamplingParams(max_new_tokens=1)
                    )
                    a.adapters.UploadAdapter(upload_chunks(name, adapter), timeout=60)
                    servable.append(_until(lambda req=req: _ok(b.inference.Generate, req)))
                    b.adapters.LoadAdapter(ref, timeout=60)
                    a.adapters.UnloadAdapter(ref, timeout=30)
                    unloaded.append(
                        _until(
                            lambda ref=ref: (
                                b.adapters.GetAdapter(ref, timeout=10).state
                                == adapters_pb2.ADAPTER_STATE_STORED
                            )
                        )
                    )
                    a.adapters.DeleteAdapter(ref, timeout=30)
                    deleted.append(_until(lambda req=req: not _ok(b.inference.Generate, req)))
            finally:
                a.stop()
                b.stop()
    print(
        f"fleet figures, {args.trials} trials, 2 replicas on PostgreSQL + S3 (moto) on loopback, {_machine()}"
    )
    print("| figure | p50 ms | max ms | goal |")
    print("|---|---|---|---|")
    for label, xs in (
        ("upload on A -> servable on B", servable),
        ("delete on A -> NOT_FOUND on B", deleted),
        ("unload on A -> evicted on B (NOTIFY)", unloaded),
    ):
        print(f"| {label} | {statistics.median(xs) * 1000:.1f} | {max(xs) * 1000:.1f} | < 1000 |")


def _ok(call, req) -> bool:
    try:
        call(req, timeout=30)
        return True
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False


def _machine() -> str:
    import os

    return f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared machine)"


if __name__ == "__main__":
    main()
