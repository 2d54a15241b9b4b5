"""Co-serving figures (docs/design.md §6, figure 6) on the default model:

- seconds from CreateFineTune with 64 labelled examples to a servable adapter, HEAD_ONLY and LORA;
- inference p50/p99 latency of short Generate calls while a fine-tune runs vs idle (goal ≤ 1.5× p50).

    .venv/bin/python benchmarks/finetune.py     # prints, updates the ## Fine-tuning section of RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from results_file import write_lines  # benchmarks/results_file.py

from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig
from hotlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc

DATA = Path(__file__).parents[1] / "tests" / "e2e" / "data" / "topics.jsonl"
PROMPTS = ["Tell me a fact about the sea.", "What is a good breakfast?", "Name a planet.", "Say hello."]
TERMINAL = {
    training_pb2.JOB_STATE_SUCCEEDED,
    training_pb2.JOB_STATE_FAILED,
    training_pb2.JOB_STATE_CANCELLED,
    training_pb2.JOB_STATE_REJECTED,
}


def machine() -> str:
    import os
    import platform

    import torch

    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    text = f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def examples(n: int) -> list[training_pb2.Example]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()][:n]
    return [training_pb2.Example(text=r["text"], label=r["label"]) for r in rows]


def time_to_servable(training, inference, name: str, method) -> tuple[float, str]:
    t0 = time.perf_counter()
    job = training.CreateFineTune(
        training_pb2.FineTuneRequest(
            adapter=name,
            task=common_pb2.TASK_SEQ_CLS,
            method=method,
            examples=examples(64),
            promote=training_pb2.PROMOTE_ALWAYS,
        ),
        timeout=60,
    )
    for event in training.WatchFineTune(common_pb2.JobRef(id=job.id), timeout=900):
        job = event.job
    inference.Classify(
        inference_pb2.ClassifyRequest(adapter=job.result_adapter, texts=["It will rain."]), timeout=60
    )
    seconds = time.perf_counter() - t0
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job ended {training_pb2.JobState.Name(job.state)}: {job.error}")
    return seconds, f"{job.metrics.metric_name} {job.metrics.validation_metric:.2f}"


def latencies(inference, n: int, new_tokens: int = 8) -> list[float]:
    """Seconds of each of `n` sequential Generate calls of `new_tokens` tokens."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        inference.Generate(
            inference_pb2.GenerateRequest(
                prompt=PROMPTS[i % len(PROMPTS)], params=common_pb2.SamplingParams(max_new_tokens=new_tokens)
            ),
            timeout=120,
        )
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q=0.5 is the median)."""
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=80, help="Generate calls per latency measurement")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        server = HotloraServer(
            ServerConfig(port=0, metrics_port=-1, http_port=-1, data_dir=data_dir, grace_seconds=1.0)
        )
        server.start()
        server.load()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        training = training_pb2_grpc.TrainingStub(channel)
        inference = inference_pb2_grpc.InferenceStub(channel)
        try:
            latencies(inference, 4)  # warm-up
            ready = {
                m: time_to_servable(
                    training,
                    inference,
                    f"bench-{m.lower().replace('_', '-')}",
                    training_pb2.FineTuneMethod.Value("METHOD_" + m),
                )
                for m in ("HEAD_ONLY", "LORA")
            }
            idle = latencies(inference, args.requests)
            job = training.CreateFineTune(
                training_pb2.FineTuneRequest(
                    adapter="bench-busy",
                    task=common_pb2.TASK_SEQ_CLS,
                    method=training_pb2.METHOD_LORA,
                    examples=examples(240),
                    hyperparameters=training_pb2.HyperParameters(epochs=50),
                ),
                timeout=60,
            )
            while training.GetFineTune(common_pb2.JobRef(id=job.id)).metrics.step < 2:
                time.sleep(0.1)
            busy = latencies(inference, args.requests)
            state = training.GetFineTune(common_pb2.JobRef(id=job.id)).state
            training.CancelFineTune(common_pb2.JobRef(id=job.id))
            if state != training_pb2.JOB_STATE_RUNNING:
                raise RuntimeError("the background job was not running during the measurement")
        finally:
            channel.close()
            server.shutdown(grace=1.0)
    cfg = server.config
    lines = [
        f"{datetime.date.today().isoformat()} · {machine()} · SmolLM2-135M-Instruct fp32 · "
        f"train_share {cfg.train_share} · `python benchmarks/finetune.py`",
        "",
        "| 64 labelled examples (SEQ_CLS, 4 topics) → servable adapter | seconds | validation |",
        "|---|---|---|",
        *[f"| {m} | {s:.1f} | {v} |" for m, (s, v) in ready.items()],
        "",
        f"| Generate, 8 new tokens, {args.requests} sequential calls | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| idle | {pct(idle, 0.5) * 1e3:.0f} | {pct(idle, 0.99) * 1e3:.0f} |",
        f"| while a LORA fine-tune runs | {pct(busy, 0.5) * 1e3:.0f} | {pct(busy, 0.99) * 1e3:.0f} |",
        f"| ratio (goal p50 ≤ 1.5×) | **{pct(busy, 0.5) / pct(idle, 0.5):.2f}×** | "
        f"{pct(busy, 0.99) / pct(idle, 0.99):.2f}× |",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_lines("Fine-tuning", lines)


if __name__ == "__main__":
    main()
