"""A fine-tune job while its registry database cannot be written: the job goes on or ends, and its outcome
is stored once the database answers again, never left RUNNING (the fleet's version of this, with a real
PostgreSQL stopped under traffic, is tests/fleet/test_fleet_faults.py)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from hotlora.adapters.errors import Unavailable
from hotlora.v1 import common_pb2, training_pb2
from tests.server.harness import running_server
from tests.server.training_utils import TERMINAL, marker_examples, seq_cls, wait_state

WAIT_S = 120.0
JOB_CALLS = ("save_job", "add_job_event", "get_job", "list_jobs", "job_events")  # what a job writes and reads
COMMIT_CALLS = ("usage", "insert_next_version", "get", "versions")  # what promoting it needs


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    with running_server(tiny_model_dir, tmp_path / "data") as run:
        yield run


class Outage:
    """The metadata store answers Unavailable to every call named while it lasts."""

    def __init__(self, store, calls, monkeypatch):
        self.down = threading.Event()
        for name in calls:
            real = getattr(store, name)

            def failing(*args, _real=real, **kwargs):
                if self.down.is_set():
                    raise Unavailable("the adapter registry test-db is unavailable (stopped); retry later")
                return _real(*args, **kwargs)

            monkeypatch.setattr(store, name, failing)


def test_a_job_that_ends_while_the_database_is_down_is_stored_as_ended_when_it_is_back(
    server, monkeypatch, caplog
):
    store = server.state.training.store
    outage = Outage(store, JOB_CALLS + COMMIT_CALLS, monkeypatch)
    job = server.training.CreateFineTune(
        seq_cls("outage-job", marker_examples(24, 4), method=training_pb2.METHOD_HEAD_ONLY,
                promote=training_pb2.PROMOTE_ALWAYS), timeout=30,
    )  # fmt: skip
    wait_state(server.training, job.id, {training_pb2.JOB_STATE_RUNNING}, timeout=WAIT_S)
    caplog.set_level(logging.WARNING, logger="hotlora.finetune")
    outage.down.set()
    deadline = time.monotonic() + WAIT_S
    while not any("not stored yet" in r.getMessage() for r in caplog.records):  # ended in memory
        assert time.monotonic() < deadline, "the job never ended while the database was down"
        time.sleep(0.05)
    outage.down.clear()

    ended = wait_state(server.training, job.id, TERMINAL, timeout=WAIT_S)
    # promoting needed the database: the job failed, saying why, rather than staying RUNNING
    assert ended.state == training_pb2.JOB_STATE_FAILED, ended
    assert "adapter registry" in ended.error and "unavailable" in ended.error
    events = list(server.training.WatchFineTune(common_pb2.JobRef(id=job.id), timeout=30))
    assert events[-1].job.state == training_pb2.JOB_STATE_FAILED
    assert events[-1].message == ended.error
    assert store.count_jobs_by_state().get("RUNNING", 0) == 0
