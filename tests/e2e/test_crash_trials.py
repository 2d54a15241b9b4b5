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
