"""SIGKILL `hotlora serve` at random moments during uploads and deletes, restart it, check the registry
(the short version of benchmarks/crash_trials.py; HOTLORA_CRASH_TRIALS=N for more). Distinct from
test_crash_safety.py: two concurrent clients, deletes as well as uploads, one data dir across every trial."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TRIALS = int(os.environ.get("HOTLORA_CRASH_TRIALS", "5"))


def _harness():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "crash_trials.py"
    spec = importlib.util.spec_from_file_location("hotlora_crash_trials", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_registry_survives_sigkill_during_uploads_and_deletes(tmp_path):
    lines: list[str] = []
    res = _harness().run_trials(TRIALS, seed=7, workdir=tmp_path, max_kill_delay=1.5, log=lines.append)
    assert res["survived"] == TRIALS, "\n".join(lines)
    assert res["uploads"] > 0 and res["deletes"] > 0, (
        "the kills landed before any work: the trials proved nothing"
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_during_fine_tune_promotion_leaves_no_running_job_and_no_partial_adapter(tmp_path):
    """Fine-tunes (HEAD_ONLY: seconds each, so kills land in training, at promotion and between jobs),
    SIGKILL at a random moment, restart: no job QUEUED/RUNNING, every SUCCEEDED job's adapter is listed
    whole, every listed adapter exports and its blobs are exactly what the registry references."""
    import hashlib
    import random
    import time

    import grpc

    from hotlora.v1 import adapters_pb2, common_pb2, training_pb2, training_pb2_grpc
    from tests.server.training_utils import marker_examples, seq_cls
    from tests.tiny import save_tiny_model_dir

    h = _harness()
    model_dir = save_tiny_model_dir(tmp_path / "model")
    data_dir = tmp_path / "data"
    rng = random.Random(11)
    promoted_seen = 0
    for trial in range(3):
        server = h.ServerProcess(model_dir, data_dir, tmp_path / "server.log")
        ch = grpc.insecure_channel(server.address)
        training = training_pb2_grpc.TrainingStub(ch)
        deadline = time.monotonic() + rng.uniform(1.0, 6.0)
        try:
            i = 0
            while time.monotonic() < deadline:
                # validation given: one fit per job (24 examples alone would be cross-validated: 6 fits)
                job = training.CreateFineTune(
                    seq_cls(f"ft-{trial}-{i}", marker_examples(24, i), method=training_pb2.METHOD_HEAD_ONLY,
                            validation=marker_examples(6, 1000 + i),
                            promote=training_pb2.PROMOTE_ALWAYS), timeout=10)  # fmt: skip
                i += 1
                while time.monotonic() < deadline:
                    got = training.GetFineTune(common_pb2.JobRef(id=job.id), timeout=10)
                    if got.state not in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING):
                        break
                    time.sleep(0.02)
        except grpc.RpcError:
            pass
        finally:
            ch.close()
            server.kill()

        server = h.ServerProcess(model_dir, data_dir, tmp_path / "server.log")
        ch = grpc.insecure_channel(server.address)
        try:
            training = training_pb2_grpc.TrainingStub(ch)
            adapters = h._stubs(server.address)[1]
            jobs = training.ListFineTunes(training_pb2.ListFineTunesRequest(), timeout=10).jobs
            states = {training_pb2.JobState.Name(j.state) for j in jobs}
            assert not states & {"JOB_STATE_QUEUED", "JOB_STATE_RUNNING"}, states
            listed = adapters.ListAdapters(
                adapters_pb2.ListAdaptersRequest(all_versions=True), timeout=10
            ).adapters
            refs = {f"{a.name}@{a.version}" for a in listed}
            for j in jobs:
                if j.state == training_pb2.JOB_STATE_SUCCEEDED:
                    assert j.result_adapter in refs, f"promoted {j.result_adapter} is missing"
                    promoted_seen += 1
            referenced = set()
            for a in listed:
                files = {}
                for c in adapters.ExportAdapter(
                    common_pb2.AdapterRef(name=f"{a.name}@{a.version}"), timeout=10
                ):
                    files[c.filename] = files.get(c.filename, b"") + c.data
                assert hashlib.sha256(files["adapter_model.safetensors"]).hexdigest() == a.sha256
                referenced |= {hashlib.sha256(d).hexdigest() for d in files.values()}
            on_disk = {p.parent.name + p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}
            # job artifacts (kept for REJECTED jobs) are referenced by their jobs, not by adapters
            assert referenced <= on_disk
        finally:
            ch.close()
            server.kill()
    assert promoted_seen > 0, "no job finished before the kills: the trials proved nothing"
