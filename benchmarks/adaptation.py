"""Adaptation figures (issue 16) on the default model, one run:

- for 24-, 80- and 240-example review-sentiment tasks: the score the job validated, the accuracy on 90
  reviews no job saw (EvaluateAdapter on the job's adapter, promoted or not) and the seconds to a
  promoted adapter, AUTO vs each fixed method;
- Generate p50/p99 while a LORA job runs vs idle, and the job's training throughput (optimizer steps
  per second) while serving vs alone;
- with --qlora instead: LORA and LORA_PROGRESSIVE jobs on an fp32 base (--weight-dtype float32) and on the
  same weights quantized to Q4_0 (--quantize q4_0: QLoRA-style, the base's forward and input gradient
  through the block kernels), held-out accuracy and seconds side by side.

    .venv/bin/python benchmarks/adaptation.py [--sizes 24,80,240] [--max-train-unit-ms 50] [--no-write]
    .venv/bin/python benchmarks/adaptation.py --qlora [--sizes 80,240]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import threading
import time
from pathlib import Path

import grpc
from finetune import latencies, machine, pct  # benchmarks/finetune.py, beside this script
from results_file import write_lines  # benchmarks/results_file.py

from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig
from hotlora.v1 import common_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc

DATA = Path(__file__).parents[1] / "tests" / "e2e" / "data" / "reviews.jsonl"
POOL, HELD_OUT = 240, 90
METHODS = ("AUTO", "HEAD_ONLY", "LORA", "LORA_PROGRESSIVE")


def reviews() -> tuple[list[training_pb2.Example], list[training_pb2.Example]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    ex = [training_pb2.Example(text=r["text"], label=r["label"]) for r in rows]
    return ex[:POOL], ex[POOL : POOL + HELD_OUT]


def run_job(training, req) -> tuple[training_pb2.FineTuneJob, float]:
    t0 = time.perf_counter()
    job = training.CreateFineTune(req, timeout=60)
    for event in training.WatchFineTune(common_pb2.JobRef(id=job.id), timeout=3600):
        job = event.job
    return job, time.perf_counter() - t0


def compare_methods(training, sizes: list[int], methods: tuple[str, ...], base: str = "") -> list[str]:
    pool, held_out = reviews()
    lines = [
        f"| examples | {'base | ' if base else ''}method | state | chosen | validated (scheme) | "
        "held-out accuracy | seconds |",
        f"|---|{'---|' if base else ''}---|---|---|---|---|---|",
    ]
    for n in sizes:
        for method in methods:
            req = training_pb2.FineTuneRequest(
                adapter=f"reviews-{n}-{method.lower().replace('_', '-')}",
                task=common_pb2.TASK_SEQ_CLS,
                method=training_pb2.FineTuneMethod.Value("METHOD_" + method),
                examples=pool[:n],
            )
            job, seconds = run_job(training, req)
            m = job.metrics
            held = training.EvaluateAdapter(
                training_pb2.EvaluateRequest(job_id=job.id, examples=held_out), timeout=600
            )
            state = training_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
            chosen = training_pb2.FineTuneMethod.Name(job.method).removeprefix("METHOD_")
            where = f"{base} | " if base else ""
            line = (
                f"| {n} | {where}{method} | {state} | {chosen} | {m.validation_metric:.3f} ± "
                f"{m.validation_stderr:.3f} ({m.validation_scheme}) | {held.accuracy:.3f} | "
                f"{seconds:.1f}{'' if job.promoted else ' (not promoted)'} |"
            )
            print(line, flush=True)
            if method == "AUTO":
                for c in m.candidates:
                    print(
                        f"    {c.name}: {c.status} {c.score:.3f} ± {c.stderr:.3f} {c.seconds:.1f} s {c.note}"
                    )
                print(f"    why: {m.winner_reason}", flush=True)
            lines.append(line)
    return lines


def steps_per_second(training, job_id: str, seconds: float) -> float:
    ref = common_pb2.JobRef(id=job_id)
    first = training.GetFineTune(ref).metrics.step
    time.sleep(seconds)
    return (training.GetFineTune(ref).metrics.step - first) / seconds


def co_serving(training, inference, requests: int) -> list[str]:
    pool, held_out = reviews()
    latencies(inference, 4, new_tokens=16)  # warm-up
    idle = latencies(inference, requests, new_tokens=16)
    req = training_pb2.FineTuneRequest(
        adapter="busy",
        task=common_pb2.TASK_SEQ_CLS,
        method=training_pb2.METHOD_LORA,
        examples=pool,
        validation=held_out,  # held out as given: one long LoRA run, no folds
        hyperparameters=training_pb2.HyperParameters(epochs=100),
    )
    job = training.CreateFineTune(req, timeout=60)
    ref = common_pb2.JobRef(id=job.id)
    while training.GetFineTune(ref).metrics.step < 2:  # past the features, into LoRA steps
        time.sleep(0.2)
    alone = steps_per_second(training, job.id, 20.0)
    rate: list[float] = []
    meter = threading.Thread(target=lambda: rate.append(steps_per_second(training, job.id, 15.0)))
    meter.start()
    busy = latencies(inference, requests, new_tokens=16)
    meter.join()
    state = training.GetFineTune(ref).state
    training.CancelFineTune(ref)
    if state != training_pb2.JOB_STATE_RUNNING:
        raise RuntimeError("the LORA job was not running during the measurement")
    return [
        f"| Generate, 16 new tokens, {requests} sequential calls | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| idle | {pct(idle, 0.5) * 1e3:.0f} | {pct(idle, 0.99) * 1e3:.0f} |",
        f"| while a LORA fine-tune runs | {pct(busy, 0.5) * 1e3:.0f} | {pct(busy, 0.99) * 1e3:.0f} |",
        f"| ratio (goal p50 ≤ 1.5×, p99 ≤ 2.5×) | **{pct(busy, 0.5) / pct(idle, 0.5):.2f}×** | "
        f"**{pct(busy, 0.99) / pct(idle, 0.99):.2f}×** |",
        "",
        "| LORA training throughput | optimizer steps/s |",
        "|---|---|",
        f"| alone | {alone:.2f} |",
        f"| while serving sequential Generate calls | {rate[0]:.2f} "
        f"({rate[0] / max(alone, 1e-9):.0%} of alone) |",
    ]


QLORA_BASES = {"fp32": dict(weight_dtype="float32"), "q4_0": dict(quantize="q4_0")}


def qlora(sizes: list[int], max_train_unit_ms: float) -> list[str]:
    """LORA and LORA_PROGRESSIVE on the fp32 base and on it quantized to Q4_0, one server after the other."""
    rows: list[str] = []
    for base, options in QLORA_BASES.items():
        with tempfile.TemporaryDirectory() as data_dir:
            cfg = ServerConfig(
                port=0, metrics_port=-1, http_port=-1, data_dir=data_dir, grace_seconds=1.0,
                max_train_unit_ms=max_train_unit_ms, max_jobs_per_tenant=2, dtype="float32", **options,
            )  # fmt: skip
            server = HotloraServer(cfg)
            server.start()
            server.load()
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            try:
                got = compare_methods(
                    training_pb2_grpc.TrainingStub(channel), sizes, ("LORA", "LORA_PROGRESSIVE"), base
                )
            finally:
                channel.close()
                server.shutdown(grace=1.0)
        rows += got if not rows else got[2:]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="24,80,240", help="training set sizes (comma-separated)")
    ap.add_argument("--methods", default=",".join(METHODS), help="methods to compare (comma-separated)")
    ap.add_argument("--requests", type=int, default=60, help="Generate calls per latency measurement")
    ap.add_argument("--max-train-unit-ms", type=float, default=ServerConfig().max_train_unit_ms)
    ap.add_argument("--skip-methods", action="store_true", help="only the co-serving figures")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--qlora", action="store_true", help="LoRA on an fp32 vs a q4_0 base (only that)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if args.qlora:
        rows = qlora(sizes, args.max_train_unit_ms)
        lines = [
            f"{datetime.date.today().isoformat()} · {machine()} · SmolLM2-135M-Instruct · "
            "`python benchmarks/adaptation.py --qlora` (machine shared with other jobs: figures are noisy)",
            "",
            "Review sentiment; held-out: 90 reviews no job saw. fp32 base: --weight-dtype float32; q4_0 "
            "base: --quantize q4_0 (projections in Q4_0, embedding and LM head in Q8_0: 576-weight rows).",
            "",
            *rows,
        ]
        print("\n".join(lines))
        if not args.no_write:
            write_lines("Adaptation on a quantized base (QLoRA)", lines)
        return
    with tempfile.TemporaryDirectory() as data_dir:
        cfg = ServerConfig(
            port=0,
            metrics_port=-1,
            http_port=-1,  # no HTTP door: its default port may be taken
            data_dir=data_dir,
            grace_seconds=1.0,
            max_train_unit_ms=args.max_train_unit_ms,
            max_jobs_per_tenant=2,
        )
        server = HotloraServer(cfg)
        server.start()
        server.load()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        training = training_pb2_grpc.TrainingStub(channel)
        inference = inference_pb2_grpc.InferenceStub(channel)
        try:
            chosen = tuple(m.strip().upper() for m in args.methods.split(",") if m.strip())
            methods = [] if args.skip_methods else compare_methods(training, sizes, chosen)
            serving = co_serving(training, inference, args.requests)
        finally:
            channel.close()
            server.shutdown(grace=1.0)
    lines = [
        f"{datetime.date.today().isoformat()} · {machine()} · SmolLM2-135M-Instruct fp32 · "
        f"train_share {cfg.train_share} · max_train_unit_ms {cfg.max_train_unit_ms:g} · "
        "`python benchmarks/adaptation.py` (machine shared with other jobs: figures are noisy)",
        "",
        *(
            [
                "Review sentiment (tests/e2e/data/reviews.jsonl); held-out: 90 reviews no job saw, scored "
                "with EvaluateAdapter on each job's adapter (also when the gate rejected it).",
                "",
                *methods,
                "",
            ]
            if methods
            else []
        ),
        *serving,
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_lines("Adaptation", lines)


if __name__ == "__main__":
    main()
