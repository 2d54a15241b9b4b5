"""How long the `hotlora` console script takes for commands that need no model (`--help`, a client
command against a server that is not there), wall and CPU time, and whether it imported torch.

CPU time (user + system of the child) is the figure to compare: on a machine shared with other work the
wall time grows with the load average, which is printed beside it.

    .venv/bin/python benchmarks/cli_startup.py [--runs 5]

Writes the figures, with date and machine, into the ``## CLI start-up`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_lines

HOTLORA = str(Path(sys.executable).with_name("hotlora"))


def _closed_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


COMMANDS = {
    "hotlora --help": ["--help"],
    "hotlora serve --help": ["serve", "--help"],
    "hotlora serve --max-batch-size 0 (refused)": ["serve", "--max-batch-size", "0"],
    "hotlora adapters list (no server)": ["adapters", "list", "--timeout", "2", "--address", "ADDR"],
}


def run_once(argv: list[str]) -> tuple[float, float, bool]:
    """(wall s, CPU s, imported torch) of one run."""
    argv = [_closed_address() if a == "ADDR" else a for a in argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = subprocess.run([HOTLORA, *argv], capture_output=True, text=True, env=env, timeout=300)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    torch = any(line.rstrip().endswith("| torch") for line in out.stderr.splitlines())
    return wall, cpu, torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at start; `benchmarks/cli_startup.py --runs {args.runs}`; "
        "median of the runs (PYTHONPROFILEIMPORTTIME on: it adds a little).",
        "",
        "| command | wall s | CPU s | imports torch |",
        "|---|---|---|---|",
    ]
    for name, argv in COMMANDS.items():
        runs = sorted(run_once(argv) for _ in range(args.runs))
        wall = sorted(r[0] for r in runs)[len(runs) // 2]
        cpu = sorted(r[1] for r in runs)[len(runs) // 2]
        line = f"| `{name}` | {wall:.2f} | {cpu:.2f} | {'yes' if any(r[2] for r in runs) else 'no'} |"
        print(line, flush=True)
        lines.append(line)
    lines.append(f"\nload average {os.getloadavg()[0]:.1f} at the end.")
    write_lines("CLI start-up", lines)


if __name__ == "__main__":
    main()
