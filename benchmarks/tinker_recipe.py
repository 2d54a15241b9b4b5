"""tinker-cookbook's supervised recipe, unmodified, trained on hotlora's resident default model (issue 32):
its loss curve and seconds per step, alone and while 8 concurrent callers keep sending short Generate calls
to the same server, whose p50 latency is compared with the same callers on an idle server (goal ≤ 1.5×).

The recipe is `tinker_cookbook.recipes.sl_basic.main` (the cookbook's supervised train loop, its checkpoints
and logs) with the recipe's own settings; what differs is only what cannot come from the network here: the
model (hotlora's default, its local directory as `model_name`, so the cookbook's tokenizer loads from it; the
recipe's blueprint looks a renderer up by Qwen/Llama name, so the config is built here with the generic
`role_colon` renderer) and the data (the cookbook's own example_data/conversations.jsonl instead of a Hugging
Face download), `base_url` pointed at hotlora, and a batch/step count that fits a 2-core CPU. hotlora serves
with `--tinker-unembed without` (the recipe asks the SDK's default train_unembed=True; hotlora has no LM head
LoRA yet and trains attention and MLP, the session is told so).

    .venv/bin/python benchmarks/tinker_recipe.py [--steps 8 --batch 16]   # prints; updates RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from results_file import write_lines  # benchmarks/results_file.py

from hotlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me a fact about the sea.", "What is a good breakfast?", "Name a planet.", "Say hello."]
CALLERS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, data_dir: str) -> tuple[subprocess.Popen, int, int]:
    grpc_port, http_port = free_port(), free_port()
    cmd = [
        str(Path(sys.executable).with_name("hotlora")), "serve", "--model", model_dir,
        "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "-1",
        "--data-dir", data_dir, "--tinker-unembed", "without",
    ]  # fmt: skip
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(data_dir) / "server.log", "w")  # noqa: SIM115 (the server's for its life)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    while True:  # until it serves (the model loads in seconds; a server that died is reported)
        if proc.poll() is not None:
            raise RuntimeError(f"hotlora exited {proc.returncode}: see {data_dir}/server.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, grpc_port, http_port
        except OSError:
            pass
        time.sleep(0.5)


class Callers:
    """CALLERS threads, each sending short Generate calls back to back; latencies in seconds."""

    def __init__(self, address: str, new_tokens: int = 8):
        self.channel = grpc.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.new_tokens = new_tokens
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(CALLERS)]

    def _loop(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            req = inference_pb2.GenerateRequest(
                prompt=PROMPTS[(i + n) % len(PROMPTS)],
                params=common_pb2.SamplingParams(max_new_tokens=self.new_tokens, ignore_eos=True),
            )
            t0 = time.perf_counter()
            self.stub.Generate(req, timeout=300)
            self.latencies.append(time.perf_counter() - t0)
            n += 1

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()
        self.channel.close()


def run_recipe(model_dir: str, http_port: int, log_path: str, steps: int, batch: int) -> list[dict]:
    """The recipe in a child process (its own interpreter, as a user runs it); its metrics.jsonl rows."""
    env = {**os.environ, "TINKER_API_KEY": "tml-dev-mode"}
    cmd = [sys.executable, __file__, "--recipe", model_dir, str(http_port), log_path, str(steps), str(batch)]
    with open(f"{log_path}.log", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        print(Path(f"{log_path}.log").read_text()[-4000:], file=sys.stderr)
        raise RuntimeError(f"the recipe exited {done.returncode}")
    rows = [json.loads(line) for line in (Path(log_path) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train_mean_nll" in r]


def recipe_main(model_dir: str, http_port: int, log_path: str, steps: int, batch: int) -> None:
    """sl_basic's main on the cookbook's example conversations (the child process)."""
    import chz
    import tinker_cookbook
    from tinker_cookbook import renderers
    from tinker_cookbook.recipes import sl_basic
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    conversations = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model_dir,
        renderer_name="role_colon",
        max_length=1024,
        batch_size=batch,
        train_on_what=renderers.TrainOnWhat.ALL_ASSISTANT_MESSAGES,
    )
    config = (
        chz.Blueprint(train.Config)
        .apply(
            {  # sl_basic's own settings, then what this machine needs (above)
                "log_path": log_path,
                "model_name": model_dir,
                "recipe_name": "recipe_sl_basic",
                "renderer_name": "role_colon",
                "dataset_builder": FromConversationFileBuilder(
                    common_config=common, file_path=str(conversations)
                ),
                "learning_rate": 2e-4,
                "lr_schedule": "linear",
                "num_epochs": 1,
                "eval_every": 8,
                "base_url": f"http://127.0.0.1:{http_port}",
                "max_steps": steps,
            }
        )
        .make()
    )
    sl_basic.main(config)


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per run of the recipe")
    ap.add_argument("--batch", type=int, default=16, help="conversations per step (the file has 128)")
    ap.add_argument("--idle-seconds", type=float, default=30.0, help="length of the idle latency measurement")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--recipe", nargs=5, help=argparse.SUPPRESS)  # the child process: run the recipe
    args = ap.parse_args()
    if args.recipe:
        model_dir, port, log_path, steps, batch = args.recipe
        recipe_main(model_dir, int(port), log_path, int(steps), int(batch))
        return

    from hotlora.server.model_loading import prepare_default_model

    model_dir = str(prepare_default_model(Path.home() / ".cache" / "hotlora"))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        proc, grpc_port, http_port = start_server(model_dir, str(Path(tmp) / "data"))
        address = f"127.0.0.1:{grpc_port}"
        try:
            with Callers(address) as warm:  # warm-up: kernels, KV blocks
                while len(warm.latencies) < 2 * CALLERS:
                    time.sleep(0.1)
            with Callers(address) as idle:
                time.sleep(args.idle_seconds)
            t0 = time.perf_counter()
            alone = run_recipe(model_dir, http_port, str(Path(tmp) / "alone"), args.steps, args.batch)
            alone_s = time.perf_counter() - t0
            with Callers(address) as busy:
                t0 = time.perf_counter()
                shared = run_recipe(model_dir, http_port, str(Path(tmp) / "shared"), args.steps, args.batch)
                shared_s = time.perf_counter() - t0
            with Callers(address) as idle_after:  # idle again: the machine's load moves meanwhile
                time.sleep(args.idle_seconds)
        except BaseException:
            print((Path(tmp) / "data" / "server.log").read_text()[-4000:], file=sys.stderr)  # why, if it was
            raise
        finally:
            proc.terminate()
            proc.wait(60)
    load_after = os.getloadavg()

    def curve(rows):
        return " ".join(f"{r['train_mean_nll']:.3f}" for r in rows)

    def per_step(rows):
        return statistics.median(r["time/step"] for r in rows)

    p50_before, p50_after = pct(idle.latencies, 0.5), pct(idle_after.latencies, 0.5)
    p50_idle, p50_busy = min(p50_before, p50_after), pct(busy.latencies, 0.5)
    ratio = p50_busy / p50_idle  # against the faster idle measurement
    command = " ".join(["benchmarks/tinker_recipe.py", *sys.argv[1:]])
    lines = [
        f"{datetime.date.today()}, `{command}`; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (2-core machine shared with other engineers); "
        f"default model (SmolLM2-135M-Instruct), recipe `tinker_cookbook.recipes.sl_basic` (tinker-cookbook "
        f"0.6.1, tinker 0.38.0), LoRA rank 32 on attention + MLP, {args.batch} conversations a step.",
        "",
        "| run | steps | s/step (median) | wall s | train_mean_nll by step |",
        "|---|---|---|---|---|",
        f"| recipe alone | {len(alone)} | {per_step(alone):.2f} | {alone_s:.0f} | {curve(alone)} |",
        f"| recipe + {CALLERS} Generate callers | {len(shared)} | {per_step(shared):.2f} | {shared_s:.0f} | "
        f"{curve(shared)} |",
        "",
        f"Serving ({CALLERS} concurrent callers, Generate of 8 tokens): p50 idle {p50_before * 1000:.0f} ms "
        f"before and {p50_after * 1000:.0f} ms after ({len(idle.latencies)} + {len(idle_after.latencies)} "
        f"calls), {p50_busy * 1000:.0f} ms while the recipe trains ({len(busy.latencies)} calls): "
        f"**{ratio:.2f}× the faster idle p50** (goal ≤ 1.5×); p99 {pct(idle.latencies, 0.99) * 1000:.0f} / "
        f"{pct(idle_after.latencies, 0.99) * 1000:.0f} idle, {pct(busy.latencies, 0.99) * 1000:.0f} ms busy.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_lines("Tinker API: a cookbook recipe on the resident model", lines)


if __name__ == "__main__":
    main()
