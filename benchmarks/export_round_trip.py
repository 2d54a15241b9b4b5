"""Exports that reproduce the server (issue 34), on the default model, one run: a head AUTO promotes on
mean-pooled features of layer 18 (80 reviews of tests/e2e/data/reviews.jsonl; AUTO's head choices narrowed
to that one), exported, then loaded the two ways: stock PEFT (`AutoModelForSequenceClassification` +
`PeftModel.from_pretrained`, what its README.md says not to do) and hotlora.clients.exported_heads (what it
says to do). Prints the largest difference of either from the server's Classify probabilities.

    .venv/bin/python benchmarks/export_round_trip.py [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import torch
from finetune import machine  # benchmarks/finetune.py, beside this script
from results_file import write_lines  # benchmarks/results_file.py

import hotlora.adapters.training.finetune_tasks as finetune_tasks
from hotlora.adapters.head_features import HeadFeatures
from hotlora.clients import Client
from hotlora.clients.exported_heads import load_classifier
from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig, default_cache_dir
from hotlora.server.model_loading import prepare_default_model

DATA = Path(__file__).parents[1] / "tests" / "e2e" / "data" / "reviews.jsonl"
FEATURES = HeadFeatures("mean", 18)


def stock_peft(base: Path, adapter: Path, texts: list[str], labels: int) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        rows = [model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0] for t in texts]
    return torch.softmax(torch.stack(rows), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    train, texts = rows[:80], [r["text"] for r in rows[240:252]]  # 12 reviews no job saw
    base = prepare_default_model(default_cache_dir())
    finetune_tasks.auto_choices = lambda num_layers: (FEATURES,)
    with tempfile.TemporaryDirectory() as data_dir:
        cfg = ServerConfig(port=0, metrics_port=-1, http_port=-1, data_dir=data_dir, dtype="float32")
        server = HotloraServer(cfg)
        server.start()
        server.load()
        try:
            with Client(f"127.0.0.1:{server.port}") as client:
                job = client.create_finetune(
                    "reviews", "SEQ_CLS", [{"text": r["text"], "label": r["label"]} for r in train],
                    promote="ALWAYS", max_seconds=0.001,
                )  # fmt: skip
                with client.watch_finetune(job.id) as events:
                    for event in events:
                        job = event.job
                adapter = client.get_adapter("reviews")
                labels = list(adapter.labels)
                resp = client.classify(texts, adapter="reviews")
                served = torch.tensor(
                    [[{s.label: s.score for s in r.scores}[x] for x in labels] for r in resp.results]
                )
                out = Path(data_dir) / "export"
                client.export_adapter("reviews", out)
        finally:
            server.shutdown(grace=1.0)
        loader = (load_classifier(out, str(base)).probabilities(texts) - served).abs().max().item()
        stock = (stock_peft(base, out, texts, len(labels)) - served).abs().max().item()
        files = sorted(p.name for p in out.iterdir())
    lines = [
        f"{datetime.date.today().isoformat()} · {machine()} · SmolLM2-135M-Instruct fp32 · load average "
        f"{load:.1f} · `python benchmarks/export_round_trip.py`",
        "",
        f"A head AUTO promoted on {FEATURES.describe()} (`export_loader` {adapter.export_loader!r}; export: "
        f"{', '.join(files)}), 12 unseen reviews, largest difference from the server's probabilities:",
        "",
        "| loaded with | max abs difference |",
        "|---|---|",
        f"| stock PEFT (AutoModelForSequenceClassification + PeftModel) | {stock:.2e} |",
        f"| hotlora.clients.exported_heads.load_classifier | {loader:.2e} |",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_lines("Exports reproduce the server", lines)


if __name__ == "__main__":
    main()
