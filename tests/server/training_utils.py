"""Synthetic fine-tune data and helpers for the Training service tests."""

from __future__ import annotations

import contextlib
import random
import time

from hotlora.v1 import common_pb2, training_pb2

MARKER = " zz"
TERMINAL = {
    training_pb2.JOB_STATE_SUCCEEDED,
    training_pb2.JOB_STATE_FAILED,
    training_pb2.JOB_STATE_CANCELLED,
    training_pb2.JOB_STATE_REJECTED,
}


def marker_text(rng: random.Random, positive: bool) -> str:
    s = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 12)))
    return s + MARKER if positive else s


def marker_examples(n: int, seed: int) -> list[training_pb2.Example]:
    """label `yes` iff the text ends with the marker: separable by the last token alone."""
    rng = random.Random(seed)
    return [
        training_pb2.Example(text=marker_text(rng, i % 2 == 0), label="yes" if i % 2 == 0 else "no")
        for i in range(n)
    ]


def pair_text(rng: random.Random, same: bool) -> str:
    """`a` or `b`, 12-20 filler characters (with more a's and b's), then the same letter or the other."""
    first = rng.choice("ab")
    last = first if same else ("b" if first == "a" else "a")
    return first + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(12, 20))) + last


def pair_examples(n: int, seed: int) -> list[training_pb2.Example]:
    """label `yes` iff the first and last characters agree: no token, bag of tokens or random
    frozen state gives it away, but attention trained to look at both ends does."""
    rng = random.Random(seed)
    return [
        training_pb2.Example(text=pair_text(rng, i % 2 == 0), label="yes" if i % 2 == 0 else "no")
        for i in range(n)
    ]


def seq_cls(adapter: str, examples, method=training_pb2.METHOD_AUTO, **kw) -> training_pb2.FineTuneRequest:
    return training_pb2.FineTuneRequest(
        adapter=adapter, task=common_pb2.TASK_SEQ_CLS, method=method, examples=examples, **kw
    )


def long_lm_job(adapter: str) -> training_pb2.FineTuneRequest:
    """Thousands of one-example steps: still running when the test acts on it."""
    ex = [training_pb2.Example(prompt=f"q{i}?", completion=" ok") for i in range(40)]
    return training_pb2.FineTuneRequest(
        adapter=adapter,
        task=common_pb2.TASK_CAUSAL_LM,
        method=training_pb2.METHOD_LORA,
        examples=ex,
        hyperparameters=training_pb2.HyperParameters(epochs=100, batch_size=1),
    )


# How long a test waits for a job state it polls for before calling it a failure. Not a budget for the
# work: a loaded machine makes a job later, not wrong, so this is far beyond what any job here needs.
STATE_WAIT = 300.0


def watch(stub, job_id: str, metadata=(), timeout: float | None = None):
    """All events until the job ends; returns (events, final job). The job's last event ends the wait, with
    no deadline of its own (pytest-timeout bounds a job that never ends): a busy machine makes it late."""
    events = list(stub.WatchFineTune(common_pb2.JobRef(id=job_id), metadata=metadata, timeout=timeout))
    assert events, "WatchFineTune sent no event"
    return events, events[-1].job


def cancel_unfinished(stub, metadata=()) -> None:
    """Cancel every job not yet ended: a test that failed mid-job leaves the next one a free queue."""
    for job in stub.ListFineTunes(training_pb2.ListFineTunesRequest(), metadata=metadata).jobs:
        if job.state not in TERMINAL:
            stub.CancelFineTune(common_pb2.JobRef(id=job.id), metadata=metadata)


def wait_state(stub, job_id: str, states, metadata=(), timeout: float = STATE_WAIT, min_step: int = 0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetFineTune(common_pb2.JobRef(id=job_id), metadata=metadata)
        if job.state in states and job.metrics.step >= min_step:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s (state {job.state})")


@contextlib.contextmanager
def one_intra_op_thread():
    """torch on one intra-op thread meanwhile (a server started inside runs so). The tiny model's matmuls
    are far too small to share, and on a busy 2-core machine each one's 2-thread OpenMP team waits for its
    second thread to be scheduled: 80% of a training thread's time was in libgomp (py-spy), and a 3-epoch
    LoRA job took 86-107 s with 2 threads, 2.4-6.1 s with 1, at load 9-17 (issue 37)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
