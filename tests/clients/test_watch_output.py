"""What `hotlora finetune watch` prints (issue 34): the baseline from the start and never a 0 that is not a
score, and, when piped, each event as a line on stdout the moment it arrives."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from concurrent import futures

import grpc

from hotlora.clients import _render as r
from hotlora.v1 import common_pb2, training_pb2, training_pb2_grpc


def _job(state: str, **metrics) -> training_pb2.FineTuneJob:
    return training_pb2.FineTuneJob(
        id="job-1",
        adapter="sentiment",
        task=common_pb2.TASK_SEQ_CLS,
        method=training_pb2.METHOD_AUTO,
        state=training_pb2.JobState.Value(f"JOB_STATE_{state}"),
        metrics=training_pb2.FineTuneMetrics(metric_name="accuracy", **metrics),
    )


def test_the_watch_line_shows_the_baseline_from_the_start_and_no_score_before_one_is_measured():
    queued = r.metrics_text(_job("QUEUED", baseline_metric=0.5).metrics)
    assert queued == "accuracy not yet scored (baseline 0.5000)"
    unknown = r.metrics_text(_job("RUNNING").metrics)  # a continued adapter: its baseline is measured
    assert unknown == "accuracy not yet scored (baseline not yet measured)"
    # a measured 0.0 is a score and shows as one
    assert "accuracy 0.0000 (baseline 0.0000)" in r.metrics_text(
        _job("RUNNING", validation_metric=0.0, baseline_metric=0.0).metrics
    )
    done = _job("SUCCEEDED", validation_metric=0.975, baseline_metric=0.5)
    assert r.job_summary(done).endswith("(accuracy 0.9750 vs baseline 0.5000)")
    assert "accuracy" not in r.job_summary(_job("FAILED"))


class GatedTraining(training_pb2_grpc.TrainingServicer):
    """Sends one event, then waits until the test says go before the rest: a CLI that buffers its output
    shows nothing of the first event while the stream stays open."""

    def __init__(self):
        self.go = threading.Event()

    def WatchFineTune(self, request, context):
        yield training_pb2.FineTuneEvent(job=_job("RUNNING", baseline_metric=0.5), message="features")
        if not self.go.wait(300):
            return
        done = _job("SUCCEEDED", validation_metric=0.975, baseline_metric=0.5, step=4, total_steps=4)
        done.result_adapter, done.promoted = "sentiment@1", True
        yield training_pb2.FineTuneEvent(job=done, message="promoted")

    def GetFineTune(self, request, context):
        return _job("SUCCEEDED", validation_metric=0.975, baseline_metric=0.5)


def test_finetune_watch_piped_prints_each_event_as_it_arrives():
    servicer = GatedTraining()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    training_pb2_grpc.add_TrainingServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cmd = [sys.executable, "-m", "hotlora.clients.cli", "finetune", "watch", "job-1"]
    proc = subprocess.Popen(
        [*cmd, "--address", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,  # a pipe: block-buffered unless the CLI flushes
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=300)  # while the server holds the rest of the stream back
        assert first.startswith("[RUNNING] accuracy not yet scored (baseline 0.5000)  features")
        servicer.go.set()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        reader.join(timeout=30)
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert rest[0].startswith("[SUCCEEDED] step 4/4")
        assert rest[-1].strip() == (
            "job job-1 SUCCEEDED: adapter sentiment@1 promoted (accuracy 0.9750 vs baseline 0.5000)"
        )
    finally:
        servicer.go.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop(grace=None)


def test_a_piped_watch_line_is_flushed_when_it_is_written(monkeypatch):
    # the same without a process: each line reaches the pipe before the next event is read
    class Pipe:
        def __init__(self):
            self.buffer, self.delivered = "", ""

        def write(self, text):
            self.buffer += text

        def flush(self):
            self.delivered = self.buffer

        def isatty(self):
            return False

    pipe = Pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    display = r.JobProgress("job-1")
    display.update(training_pb2.FineTuneEvent(job=_job("RUNNING", baseline_metric=0.5), message="features"))
    assert pipe.delivered == "[RUNNING] accuracy not yet scored (baseline 0.5000)  features\n"


def test_adapters_show_says_how_an_export_loads():
    from hotlora.v1 import adapters_pb2

    mean = adapters_pb2.Adapter(
        head_features=common_pb2.HeadFeatures(pooling="mean", layer=18),
        export_loader="hotlora.clients.exported_heads",
    )
    details = dict(r.adapter_details(mean))
    assert details["head_features"] == "mean pooling, layer 18"
    assert details["export"].startswith("needs hotlora.clients.exported_heads.load_classifier")
    last = adapters_pb2.Adapter(head_features=common_pb2.HeadFeatures(pooling="last", layer=-1))
    assert dict(r.adapter_details(last))["export"].startswith("loads with stock PEFT")
    assert "export" not in dict(r.adapter_details(adapters_pb2.Adapter()))  # a CAUSAL_LM adapter, a list row
