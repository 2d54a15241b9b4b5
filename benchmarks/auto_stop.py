"""AUTO stops when nothing dearer can win (issue 34), on the default model, one run:

- the 40-sentence sentiment job (tests/e2e/data/sentiment40.jsonl) under AUTO with the default 600 s
  budget: the job's seconds, its heads' seconds, each candidate and why the search stopped (before the
  change LORA then trained for the whole budget: 73 s of heads + 600 s);
- a head's logistic regression (300 epochs on [40, 576] features, as HEAD_ONLY trains on the default
  model) on one thread, as trainer_cls runs it now, and on the engine's threads, on a busy CPU.

    .venv/bin/python benchmarks/auto_stop.py [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import grpc
import torch
from finetune import machine  # benchmarks/finetune.py, beside this script
from results_file import write_lines  # benchmarks/results_file.py
from torch import nn
from torch.nn import functional as F

from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig
from hotlora.v1 import common_pb2, training_pb2, training_pb2_grpc

DATA = Path(__file__).parents[1] / "tests" / "e2e" / "data" / "sentiment40.jsonl"


def sentiment_job() -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    examples = [training_pb2.Example(text=r["text"], label=r["label"]) for r in rows]
    with tempfile.TemporaryDirectory() as data_dir:
        cfg = ServerConfig(port=0, metrics_port=-1, http_port=-1, data_dir=data_dir, grace_seconds=1.0)
        server = HotloraServer(cfg)
        server.start()
        server.load()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        training = training_pb2_grpc.TrainingStub(channel)
        try:
            req = training_pb2.FineTuneRequest(
                adapter="sentiment", task=common_pb2.TASK_SEQ_CLS, method=training_pb2.METHOD_AUTO,
                examples=examples,
            )  # fmt: skip
            t0 = time.perf_counter()
            job = training.CreateFineTune(req, timeout=60)
            for event in training.WatchFineTune(common_pb2.JobRef(id=job.id), timeout=3600):
                job = event.job
            seconds = time.perf_counter() - t0
        finally:
            channel.close()
            server.shutdown(grace=1.0)
    m = job.metrics
    heads = sum(c.seconds for c in m.candidates if c.status == "scored")
    state = training_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    lines = [
        f"40 sentences, AUTO, budget {cfg.finetune_max_seconds:.0f} s: **{seconds:.1f} s** to {state} "
        f"(scored candidates {heads:.1f} s); issue 34 saw 73 s of heads, then LORA for the whole 600 s",
        "",
        "| candidate | status | score | seconds | note |",
        "|---|---|---|---|---|",
    ]
    for c in m.candidates:
        score = f"{c.score:.3f} ± {c.stderr:.3f}" if c.status == "scored" else "-"
        lines.append(f"| {c.name} | {c.status} | {score} | {c.seconds:.1f} | {c.note} |")
    return [*lines, "", f"why: {m.winner_reason}"]


def head_epochs(threads: int, epochs: int = 300) -> float:
    """Seconds for `epochs` of the head's full-batch logistic regression (as trainer_cls's phase 2)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(40, 576, generator=gen), torch.randint(0, 2, (40,), generator=gen)
        w = nn.Parameter(torch.zeros(2, 576))
        opt = torch.optim.Adam([w], lr=1e-2)
        t0 = time.perf_counter()
        for _ in range(epochs):
            loss = F.cross_entropy(x @ w.t(), y) + 1e-3 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    job = sentiment_job()
    threads = torch.get_num_threads()
    one, many = head_epochs(1), head_epochs(threads)
    lines = [
        f"{datetime.date.today().isoformat()} · {machine()} · SmolLM2-135M-Instruct fp32 · load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end · `python benchmarks/auto_stop.py`",
        "",
        *job,
        "",
        f"A head's 300 epochs on [40, 576] features: {one * 1e3:.0f} ms on one thread (trainer_cls now), "
        f"{many * 1e3:.0f} ms on {threads} threads (before): **{many / one:.1f}×**.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_lines("AUTO stops when nothing dearer can win", lines)


if __name__ == "__main__":
    main()
