"""The fleet under faults: two `hotlora serve` replicas on one PostgreSQL + S3 (started here on loopback,
like the tests) under steady traffic, while PostgreSQL is stopped and the object store frozen (SIGSTOP),
each for `--outage` seconds. Every call is counted by kind and status code during each fault:

- generate (cached): Generate with an adapter both replicas resolved and loaded before the fault;
- generate (cold): Generate on B with an adapter B never loaded (each, once it loaded, is not asked again);
- upload: UploadAdapter, alternately on A and B;
- health: both replicas' grpc.health.v1 status, polled (seconds until NOT_SERVING, and until SERVING
  again after the store is back);

plus a fine-tune job running on B when PostgreSQL stops, and its outcome. Clients use a 15 s deadline
(the issue's). Writes the `## Fleet under faults` section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/fleet_faults.py [--outage 30] [--model DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEADLINE_S = 15.0
PAUSE_S = 0.2  # between one client's calls: steady traffic, not a flood of a 2-core machine


class Tally:
    """Status codes and latencies of calls, by kind, for the phase in progress."""

    def __init__(self):
        self.lock = threading.Lock()
        self.phase = "before the faults"
        self.codes: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.first_details: dict[tuple[str, str, str], str] = {}  # a failure's message, as callers read it

    def call(self, kind: str, fn) -> bool:
        """Counted in the phase it started in."""
        t0, phase = time.monotonic(), self.phase
        try:
            fn()
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
            with self.lock:
                self.first_details.setdefault((phase, kind, code), err.details() or "")
        with self.lock:
            key = (phase, kind)
            self.codes[key][code] += 1
            self.seconds[key].append(time.monotonic() - t0)
        return code == "OK"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=30.0, help="seconds each fault lasts")
    ap.add_argument("--model", default="")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hotlora.v1 import common_pb2, inference_pb2, training_pb2
    from tests.fleet.replicas import Replica
    from tests.fleet_stores import S3_ENV, SharedStores, postgres_server, s3_server
    from tests.server.adapter_utils import make_peft_adapter, upload_chunks
    from tests.server.training_utils import marker_examples, seq_cls
    from tests.tiny import save_tiny_model_dir

    os.environ.update(S3_ENV)
    tally = Tally()
    health_log: list[tuple[float, str, int]] = []  # (time, replica, status)
    events: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else save_tiny_model_dir(tmp / "model")
        adapter = make_peft_adapter(tmp / "peft", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
        flags = ("--health-check-seconds", "1")
        with postgres_server(tmp) as pg, s3_server(tmp) as s3:
            stores = SharedStores(pg.new_database(), f"s3://{s3.new_bucket()}/fleet", s3.endpoint)
            a = Replica(model, tmp / "a", stores, name="a", job_lease_s=30.0, extra=flags)
            b = Replica(model, tmp / "b", stores, name="b", job_lease_s=30.0, extra=flags)
            stop = threading.Event()
            cold: list[str] = []
            threads: list[threading.Thread] = []
            try:

                def gen(replica, name: str):
                    return replica.inference.Generate(
                        inference_pb2.GenerateRequest(
                            prompt="hello there",
                            adapter=name,
                            params=common_pb2.SamplingParams(max_new_tokens=4),
                        ),
                        timeout=DEADLINE_S,
                    )

                def upload(replica, name: str):
                    return replica.adapters.UploadAdapter(upload_chunks(name, adapter), timeout=DEADLINE_S)

                upload(a, "cached")
                for r in (a, b):
                    gen(r, "cached")
                for i in range(
                    int(3 * args.outage / PAUSE_S / 4) + 20
                ):  # enough for every phase's cold loads
                    name = f"cold-{i}"
                    upload(a, name)
                    cold.append(name)
                cold.reverse()

                def cached_traffic(replica):
                    while not stop.is_set():
                        tally.call("generate (cached)", lambda: gen(replica, "cached"))
                        stop.wait(PAUSE_S)

                def cold_traffic():
                    while not stop.is_set() and cold:
                        name = cold[-1]  # used up only once it loaded: each phase has cold ones left
                        if tally.call("generate (cold, on B)", lambda name=name: gen(b, name)):
                            cold.pop()
                        stop.wait(PAUSE_S)

                def upload_traffic():
                    i = 0
                    while not stop.is_set():
                        replica = (a, b)[i % 2]
                        tally.call("upload", lambda r=replica, i=i: upload(r, f"up-{i}"))
                        i += 1
                        stop.wait(PAUSE_S)

                def health_watch():
                    stubs = {r.name: health_pb2_grpc.HealthStub(r.channel) for r in (a, b)}
                    while not stop.is_set():
                        for name, stub in stubs.items():
                            try:
                                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                            except grpc.RpcError:
                                status = -1
                            health_log.append((time.monotonic(), name, status))
                        stop.wait(0.25)

                threads += [threading.Thread(target=cached_traffic, args=(r,)) for r in (a, b)]
                threads += [threading.Thread(target=t) for t in (cold_traffic, upload_traffic, health_watch)]
                for t in threads:
                    t.start()
                time.sleep(args.outage / 3)

                job = b.training.CreateFineTune(
                    seq_cls("tuned", marker_examples(48, 3), method=training_pb2.METHOD_HEAD_ONLY,
                            promote=training_pb2.PROMOTE_ALWAYS), timeout=30,
                )  # fmt: skip
                _wait_running(b, job.id)
                for fault, start, end in (
                    ("PostgreSQL stopped", pg.stop, pg.start),
                    ("S3 frozen", s3.freeze, s3.thaw),
                ):
                    tally.phase = fault
                    events[f"{fault} start"] = time.monotonic()
                    start()
                    time.sleep(args.outage)
                    end()
                    events[f"{fault} end"] = time.monotonic()
                    tally.phase = f"after {fault}"
                    _wait_serving(health_log, events[f"{fault} end"])
                    time.sleep(args.outage / 3)
                stop.set()  # the traffic ends with the last phase; the job is waited for alone
                job = _wait_terminal(b, job.id)
            finally:
                stop.set()
                for t in threads:
                    t.join(DEADLINE_S + 10)
                a.stop()
                b.stop()

    lines = _report(tally, health_log, events, job, args.outage)
    print("\n".join(lines))
    if not args.no_write:
        from results_file import write_lines

        write_lines("Fleet under faults", lines)


def _wait_running(replica, job_id: str) -> None:
    from hotlora.v1 import common_pb2, training_pb2

    deadline = time.monotonic() + 120
    while replica.training.GetFineTune(common_pb2.JobRef(id=job_id), timeout=10).state != (
        training_pb2.JOB_STATE_RUNNING
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the fine-tune never started")
        time.sleep(0.05)


def _wait_terminal(replica, job_id: str):
    from hotlora.v1 import common_pb2, training_pb2

    deadline = time.monotonic() + 600
    while True:
        job = replica.training.GetFineTune(common_pb2.JobRef(id=job_id), timeout=10)
        if job.state not in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING):
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fine-tune is still {job.state} after 600 s")
        time.sleep(0.2)


def _wait_serving(health_log, since: float) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        latest = {name: status for t, name, status in health_log if t > since}
        if len(latest) == 2 and all(s == 1 for s in latest.values()):
            return
        time.sleep(0.1)
    raise RuntimeError("health did not come back to SERVING within 120 s")


def _report(tally: Tally, health_log, events, job, outage: float) -> list[str]:
    from hotlora.v1 import training_pb2

    load = os.getloadavg()
    lines = [
        f"`benchmarks/fleet_faults.py --outage {outage:g}`, {date.today()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (shared machine); 2 replicas of the tiny "
        "model on PostgreSQL + S3 (moto) on loopback, `--registry-timeout-seconds 5 "
        "--health-check-seconds 1`, "
        f"clients' deadline {DEADLINE_S:g} s, one call per client every {PAUSE_S:g} s.",
        "",
        "| phase | calls of | status codes | p50 / max seconds |",
        "|---|---|---|---|",
    ]
    for (phase, kind), codes in sorted(tally.codes.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
        xs = tally.seconds[(phase, kind)]
        shown = ", ".join(f"{c} {n}" for c, n in codes.most_common())
        lines.append(f"| {phase} | {kind} | {shown} | {statistics.median(xs):.3f} / {max(xs):.2f} |")
    lines += ["", "What the first failure of each kind said:", ""]
    for (phase, kind, code), details in sorted(tally.first_details.items(), key=lambda kv: _order(kv[0][0])):
        lines.append(f"- {phase}, {kind}: {code} `{details[:200]}`")
    lines += ["", "Each fault phase lasts the fault's time; each *after* phase, until both replicas are "
              f"SERVING again and {outage / 3:g} s more.", "",
              "| fault | replica | NOT_SERVING after (s) | SERVING again after the store is back (s) |",
              "|---|---|---|---|"]  # fmt: skip
    for fault in ("PostgreSQL stopped", "S3 frozen"):
        t0, t1 = events[f"{fault} start"], events[f"{fault} end"]
        for name in ("a", "b"):
            down = next((t for t, n, s in health_log if n == name and t0 <= t <= t1 and s == 2), None)
            up = next((t for t, n, s in health_log if n == name and t > t1 and s == 1), None)
            lines.append(f"| {fault} | {name} | {_s(down, t0)} | {_s(up, t1)} |")
    state = training_pb2.JobState.Name(job.state)
    lines += ["", f"Fine-tune running on B when PostgreSQL stopped: {state}"
              + (f" ({job.result_adapter})" if job.result_adapter else f": {job.error}")]  # fmt: skip
    return lines


def _order(phase: str) -> int:
    phases = ["before the faults", "PostgreSQL stopped", "after PostgreSQL stopped", "S3 frozen"]
    phases.append("after S3 frozen")
    return phases.index(phase) if phase in phases else len(phases)


def _s(t: float | None, since: float) -> str:
    return "never" if t is None else f"{t - since:.1f}"


if __name__ == "__main__":
    main()
