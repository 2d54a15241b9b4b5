"""Container image figures: the C kernels shipped built (the image as it is) against a compiler in the runtime
image that builds them at the first start, on image size and first-start time.

    .venv/bin/python benchmarks/image.py [--starts 2] [--no-build]   # --no-build: after `make image`

The compiler variant is the image plus `deploy/image/base.sh compiler` (gcc, g++, Python's headers) with
HOTLORA_KERNELS_DIR emptied, so each fresh container builds the kernels as any host does: some during
start-up, the rest at their first use. Each start is a new container (a first start); the two variants
alternate. Time to SERVING: from `podman run` to grpc.health.v1 SERVING, seen from the host; first Generate:
one greedy Generate of 8 tokens right after; start → first answer: their sum. Writes the
`## Container image` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_file import write_lines  # benchmarks/results_file.py

from tests.image import containers

COMPILER_TAG = containers.IMAGE + "-with-compiler"
DERIVED = f"""FROM {containers.IMAGE}
USER root
RUN sh /usr/local/lib/hotlora/base.sh compiler
USER 10001:10001
ENV HOTLORA_KERNELS_DIR=
"""


def build_compiler_variant(folder: Path) -> None:
    (folder / "Containerfile").write_text(DERIVED)
    subprocess.run(
        ["podman", "build", "--isolation", "chroot", "--format", "docker", "-t", COMPILER_TAG, str(folder)],
        check=True, stdout=subprocess.DEVNULL, timeout=1800,
    )  # fmt: skip


def first_start(image: str, folder: Path) -> tuple[float, float]:
    """(seconds to SERVING, seconds of the first Generate) of a new container."""
    with containers.running(folder, image=image) as c, c.client() as client:
        start = time.monotonic()
        client.generate("Once upon a time", max_new_tokens=8)
        return c.ready_s, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=2, help="first starts of each variant")
    parser.add_argument("--no-build", action="store_true", help="use the image `make image` built")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.no_build:
            containers.build(folder / "build.log")
        build_compiler_variant(folder)
        sizes = {image: containers.image_bytes(image) / 1e6 for image in (containers.IMAGE, COMPILER_TAG)}
        runs: dict[str, list[tuple[float, float]]] = {containers.IMAGE: [], COMPILER_TAG: []}
        for _ in range(args.starts):
            for image in runs:
                runs[image].append(first_start(image, folder))
                ready_s, first_s = runs[image][-1]
                print(f"{image}: to SERVING {ready_s:.1f} s, first Generate {first_s:.2f} s", flush=True)
    load = os.getloadavg()
    shipped, compiling = containers.IMAGE, COMPILER_TAG
    ready = {image: statistics.median(r for r, _ in runs[image]) for image in runs}
    first = {image: statistics.median(f for _, f in runs[image]) for image in runs}
    answer = {image: statistics.median(r + f for r, f in runs[image]) for image in runs}

    def row(label: str, image: str) -> str:
        return (
            f"| {label} | {sizes[image]:,.0f} MB | {ready[image]:.1f} s | {first[image]:.2f} s "
            f"| {answer[image]:.1f} s |"
        )

    lines = [
        f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f}, by `benchmarks/image.py "
        f"--starts {args.starts}` (podman, runc; medians of {args.starts} first starts each, alternating).",
        "",
        "| runtime image | size | start → SERVING | first Generate (8 tokens) | start → first answer |",
        "|---|---|---|---|---|",
        row(f"C kernels shipped built (`{shipped}`)", shipped),
        row("gcc, g++ and Python's headers inside, the kernels' module built at first start", compiling),
        "",
        f"Compiler in the image: +{sizes[compiling] - sizes[shipped]:,.0f} MB "
        f"({sizes[compiling] / sizes[shipped]:.2f}×); start → first answer "
        f"{answer[compiling] / answer[shipped]:.2f}× as long ({answer[compiling] - answer[shipped]:+.1f} s).",
    ]
    print("\n".join(lines))
    write_lines("Container image", lines)


if __name__ == "__main__":
    main()
