"""Soak: concurrent clients of several tenants mix Generate, GenerateStream (a share closed early by the
client), Classify, and upload/delete churn against one in-process server on a tiny model. Every answer is
checked against a reference computed once per (adapter, prompt) before the load; any unexpected error
counts. Reports requests, errors, p50/p99 latency, resident memory growth after warm-up, and whether the
engine's running rows return to 0 once the load stops.

    .venv/bin/python benchmarks/soak.py --seconds 300 [--clients 8]

tests/e2e/test_soak.py runs it for ~20 s.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
TENANTS = {"t1": "soak-token-1", "t2": "soak-token-2", "t3": "soak-token-3"}
PROMPTS = ["hello world", "the quick brown fox", "LoRA", "a", "once upon a time there was"]
TEXTS = ["good movie", "bad", "it was fine I guess", "terrible acting, great music"]
LABELS = ["neg", "neu", "pos"]
NEW = 8


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _md(tenant):
    return (("authorization", f"Bearer {TENANTS[tenant]}"),)


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_soak(seconds: float, clients: int, workdir: Path, log=print) -> dict:
    sys.path.insert(0, str(ROOT))
    from hotlora.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc
    from tests.server.adapter_utils import make_peft_adapter, upload_chunks
    from tests.server.harness import running_server
    from tests.tiny import save_tiny_model_dir

    model_dir = save_tiny_model_dir(workdir / "model")
    tokens = workdir / "tokens"
    tokens.write_text("".join(f"{t} {tok}\n" for t, tok in TENANTS.items()))
    gen_dirs = [
        make_peft_adapter(
            workdir / f"gen{i}",
            seed=i + 1,
            r=4 * (i + 1),
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
        )
        for i in range(2)
    ]
    cls_dir = make_peft_adapter(
        workdir / "cls",
        seed=9,
        task="SEQ_CLS",
        num_labels=3,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )

    with running_server(
        model_dir,
        workdir / "data",
        tokens_file=str(tokens),
        adapter_slots=4,
        max_rank=16,
        max_new_tokens=128,
        max_batch_size=32,
    ) as run:
        ch = run.channel
        inf = inference_pb2_grpc.InferenceStub(ch)
        ad = adapters_pb2_grpc.AdaptersStub(ch)
        # every tenant stores gen0, gen1 and cls under the same names: isolation keeps them apart
        for t in TENANTS:
            for i, d in enumerate(gen_dirs):
                ad.UploadAdapter(upload_chunks(f"gen{i}", d), metadata=_md(t))
            ad.UploadAdapter(upload_chunks("cls", cls_dir, labels=LABELS), metadata=_md(t))
        params = common_pb2.SamplingParams(max_new_tokens=NEW)
        ref_gen = {}
        for a in ("", "gen0", "gen1"):
            for p in PROMPTS:
                r = inf.Generate(
                    inference_pb2.GenerateRequest(prompt=p, adapter=a, params=params),
                    metadata=_md("t1"),
                    timeout=60,
                )
                ref_gen[(a, p)] = list(r.token_ids)
        ref_cls = {}
        r = inf.Classify(
            inference_pb2.ClassifyRequest(adapter="cls", texts=TEXTS), metadata=_md("t1"), timeout=60
        )
        for text, res in zip(TEXTS, r.results, strict=True):
            ref_cls[text] = [s.score for s in res.scores]

        stop = threading.Event()
        lock = threading.Lock()
        counts: Counter = Counter()
        errors: list[str] = []
        latencies: list[float] = []

        def fail(what):
            with lock:
                errors.append(what)

        def one(rng: random.Random, worker: int):
            tenant = rng.choice(list(TENANTS))
            op = rng.choices(["gen", "stream", "stream_cancel", "classify", "churn"], [40, 15, 15, 20, 10])[0]
            t0 = time.perf_counter()
            if op == "gen":
                a, p = rng.choice(["", "gen0", "gen1"]), rng.choice(PROMPTS)
                r = inf.Generate(
                    inference_pb2.GenerateRequest(prompt=p, adapter=a, params=params),
                    metadata=_md(tenant),
                    timeout=60,
                )
                if list(r.token_ids) != ref_gen[(a, p)]:
                    fail(f"Generate {a!r} {p!r}: {list(r.token_ids)} != {ref_gen[(a, p)]}")
            elif op.startswith("stream"):
                a, p = rng.choice(["", "gen0", "gen1"]), rng.choice(PROMPTS)
                call = inf.GenerateStream(
                    inference_pb2.GenerateRequest(prompt=p, adapter=a, params=params),
                    metadata=_md(tenant),
                    timeout=60,
                )
                ids = []
                for chunk in call:
                    ids += chunk.token_ids
                    if op == "stream_cancel" and len(ids) >= 2:
                        call.cancel()  # the client goes away mid-stream
                        break
                if ids != ref_gen[(a, p)][: len(ids)] or (op == "stream" and ids != ref_gen[(a, p)]):
                    fail(f"GenerateStream {a!r} {p!r}: {ids} vs {ref_gen[(a, p)]}")
            elif op == "classify":
                texts = rng.sample(TEXTS, rng.randint(1, len(TEXTS)))
                r = inf.Classify(
                    inference_pb2.ClassifyRequest(adapter="cls", texts=texts),
                    metadata=_md(tenant),
                    timeout=60,
                )
                for text, res in zip(texts, r.results, strict=True):
                    got = [s.score for s in res.scores]
                    if [s.label for s in res.scores] != LABELS or max(
                        abs(x - y) for x, y in zip(got, ref_cls[text], strict=True)
                    ) > 1e-3:
                        fail(f"Classify {text!r}: {got} vs {ref_cls[text]}")
            else:  # upload a copy of gen0 under a fresh name, serve it, delete it
                name = f"churn-{worker}"
                i = rng.randint(0, 1)
                ad.UploadAdapter(upload_chunks(name, gen_dirs[i]), metadata=_md(tenant), timeout=60)
                p = rng.choice(PROMPTS)
                r = inf.Generate(
                    inference_pb2.GenerateRequest(prompt=p, adapter=name, params=params),
                    metadata=_md(tenant),
                    timeout=60,
                )
                if list(r.token_ids) != ref_gen[(f"gen{i}", p)]:
                    fail(f"churn {name}: {list(r.token_ids)} != {ref_gen[(f'gen{i}', p)]}")
                ad.DeleteAdapter(common_pb2.AdapterRef(name=name), metadata=_md(tenant), timeout=30)
            dt = time.perf_counter() - t0
            with lock:
                counts[op] += 1
                if op in ("gen", "classify"):
                    latencies.append(dt)

        def worker(k):
            rng = random.Random(k)
            while not stop.is_set():
                try:
                    one(rng, k)
                except grpc.RpcError as e:
                    fail(f"{e.code().name}: {e.details()}")
                except Exception as e:  # noqa: BLE001 - every surprise is an error of the soak
                    fail(f"{type(e).__name__}: {e}")

        samples: list[tuple[float, int]] = []
        t_start = time.monotonic()
        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
        for th in threads:
            th.start()
        while time.monotonic() - t_start < seconds:
            samples.append((time.monotonic() - t_start, rss_bytes()))
            time.sleep(min(1.0, seconds / 20))
        stop.set()
        for th in threads:
            th.join(120)
        elapsed = time.monotonic() - t_start
        samples.append((elapsed, rss_bytes()))
        engine = run.state.engine
        t_idle = time.monotonic()
        while (engine.num_running or engine.num_waiting) and time.monotonic() - t_idle < 10:
            time.sleep(0.05)
        warm = [r for t, r in samples if t >= seconds * 0.25]
        rss_warm, rss_end = warm[0], samples[-1][1]
        rss_peak_after = max(warm)
        listed = sum(
            len(
                ad.ListAdapters(
                    adapters_pb2.ListAdaptersRequest(all_versions=True), metadata=_md(t), timeout=30
                ).adapters
            )
            for t in TENANTS
        )
        res = {
            "seconds": round(elapsed, 1),
            "clients": clients,
            "requests": sum(counts.values()),
            "by_op": dict(counts),
            "errors": len(errors),
            "first_errors": errors[:5],
            "p50_ms": round(_pct(latencies, 0.50) * 1000, 1),
            "p99_ms": round(_pct(latencies, 0.99) * 1000, 1),
            "rss_after_warmup_mib": round(rss_warm / 2**20, 1),
            "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_growth_mib": round((rss_end - rss_warm) / 2**20, 1),
            "rss_growth_pct": round(100 * (rss_end - rss_warm) / rss_warm, 1),
            "rss_peak_after_warmup_mib": round(rss_peak_after / 2**20, 1),
            "running_after_stop": engine.num_running,
            "waiting_after_stop": engine.num_waiting,
            "idle_after_s": round(time.monotonic() - t_idle, 2),
            "adapters_listed_after": listed,  # 3 per tenant: churn left nothing behind
        }
        log(json.dumps(res))
        return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotlora-soak-") as d:
        res = run_soak(args.seconds, args.clients, Path(d), log=lambda s: None)
    print(json.dumps(res, indent=2))
    ok = res["errors"] == 0 and res["running_after_stop"] == 0 and res["adapters_listed_after"] == 9
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
