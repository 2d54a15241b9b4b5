"""`make setup` (and so `make serve` / `make test` on a fresh clone) is never minutes of silence: each install
is announced as a numbered step saying what it brings and how big it is, and pip runs with its own progress
lines (each package, its size, its download), never `--quiet`.

What make would run is read with `make -n` for a venv that does not exist (nothing is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"""^printf '\\n==> %s\\n' "(.*)"$""")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _setup_commands(tmp_path: Path) -> list[str]:
    done = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", "setup", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.splitlines()


def test_every_install_is_a_numbered_step_that_says_what_it_brings(tmp_path):
    lines = _setup_commands(tmp_path)
    steps = [(i, STEP.match(line).group(1)) for i, line in enumerate(lines) if STEP.match(line)]
    numbered = [(i, text) for i, text in steps if re.match(r"setup \d+/\d+: ", text)]
    total = int(numbered[0][1].split("/")[1].split(":")[0])
    assert [text.split(":")[0] for _, text in numbered] == [f"setup {n}/{total}" for n in range(1, total + 1)]
    assert steps[-1][1].startswith("setup done: ") and steps[-1][0] > numbered[-1][0]
    installs = [i for i, line in enumerate(lines) if " -m pip install " in line]
    assert installs and min(installs) > numbered[0][0], "a pip install before the first step line"
    for _, text in numbered[1:]:
        assert re.search(r"\d+ (MB|GB)", text) or "stub" in text, f"a step says how much it installs: {text}"


def test_pip_shows_its_progress(tmp_path):
    for line in _setup_commands(tmp_path):
        if " -m pip " in line:
            words = line.split()
            assert "--quiet" not in words and "-q" not in words, line
