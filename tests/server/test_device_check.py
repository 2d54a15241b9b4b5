"""deploy/gpu/device-check.sh, the one command a lent GPU runs, kept from rotting: its dry run takes every
stage on this CPU with tiny sizes (the same scripts, models, adapters and figures), and the choice of
wheels that travel with the code is checked against what the device image has."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "gpu"))
import wheels  # noqa: E402 -- deploy/gpu/wheels.py

STAGES = [  # the goals' stages first, the default model's last
    "setup",
    "models",
    "decode llama-1b",
    "ttft llama-1b",
    "kernels",
    "tests",
    "decode default",
    "ttft default",
]


def test_the_dry_run_takes_every_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its own processes
    run = subprocess.run(
        [str(ROOT / "deploy/gpu/device-check.sh"), "--cpu-dry-run"],
        env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else run.stdout
    assert run.returncode == 0, summary + run.stderr[-2000:]
    for stage in STAGES:
        assert re.search(rf"^PASS {stage} \(\d+ s\)$", summary, re.M), f"{stage}:\n{summary}"
    figures = json.loads((out / "figures.json").read_text())
    assert [s["stage"] for s in figures["stages"]] == STAGES
    assert all(s["status"] == "passed" for s in figures["stages"])
    # every goal was computed from figures the stages wrote (the dry run's numbers mean nothing else)
    assert len(figures["goals"]) == 4 and all(g["value"] is not None for g in figures["goals"])
    decode = figures["figures"]["decode-llama-1b"]
    assert decode["tok_s"]["n1_mixed_graphs"] > 0 and decode["weight_bytes"] > 0
    assert figures["figures"]["kernels"]["lora_decode"]["rel_err"] < 1e-3
    assert figures["figures"]["kernels"]["attention"]["decode_rel_err"] < 1e-3
    # what a device call brings back: at most 8 files, plain names, nothing deeper
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    # `import hotlora` went through the shim (what the device has instead of an installed package)
    assert str(work / "site" / "hotlora" / "__init__.py") in (out / "setup.log").read_text()


def test_a_stage_that_fails_says_so_and_the_run_fails(tmp_path):
    """A broken stage gives its FAIL line with the log's last lines, the others still run, exit status 1."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable, "TOTAL_S": "1"}
    run = subprocess.run(
        [str(ROOT / "deploy/gpu/device-check.sh"), "--cpu-dry-run"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1
    assert "SKIP setup: the run's 1 s are spent" in (out / "summary.txt").read_text()
    run = subprocess.run(
        [str(ROOT / "deploy/gpu/device-check.sh")], env={**env, "OUT": ""}, capture_output=True, text=True
    )
    assert run.returncode != 0 and "OUT" in run.stderr  # the device run needs the folder that comes back


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return path


def test_only_what_the_image_lacks_or_has_older_is_installed(tmp_path):
    for name, version in [("gguf", "0.19.0"), ("transformers", "5.23.0"), ("regex", "2026.11.15")]:
        _fake_wheel(tmp_path, name, version)
    have = {"transformers": "5.17.0", "regex": "2026.12.1"}.get
    picked = [p.name.split("-")[0] for p in wheels.needed_wheels(tmp_path, have)]
    assert picked == ["gguf", "transformers"]  # missing; older; (regex: the image's is newer)
    _fake_wheel(tmp_path, "torch", "2.13.0")
    with pytest.raises(SystemExit, match="never carried"):
        wheels.needed_wheels(tmp_path, have)


@pytest.mark.parametrize(
    "name, spec, carried",
    [
        ("numpy", "==2.4.6", False),  # the image's 2.5.2 is newer than our pin: kept
        ("transformers", "==5.23.0", True),  # the image's 5.17.0 is older
        ("tokenizers", "<0.24.0,>=0.23.1", False),  # the image's 0.23.2 fits
        ("psutil", "", False),  # the image has it, and any version does
        ("pygments", ">=2.13.0,<3.0.0", True),  # the image has it, its version unknown
        ("opentelemetry-api", ">=1.44.0", True),  # not in the image
    ],
)
def test_the_wheels_that_travel_are_what_the_image_may_not_satisfy(name, spec, carried):
    assert wheels.image_satisfies(name, SpecifierSet(spec)) is not carried


def test_the_code_leaves_room_for_the_wheels():
    """The device call carries 64 MiB: the tree and .whl/ (measured 2026-12-07: 35 MiB of wheels)."""
    assert wheels.tree_bytes() + (40 << 20) < wheels.BUDGET - wheels.MARGIN
