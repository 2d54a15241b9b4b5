"""Print the pinned requirements (pyproject.toml) that a GPU host still needs, one per line.

Used by `make setup-gpu`. torch and triton are never listed: on a GPU host they are the CUDA build, installed
first (from the CUDA wheel index, or already in the image with SYSTEM_TORCH=1). With --keep-newer, a package
the host already has at the pinned version or newer is kept (a GPU image's transformers or numpy is built and
tested with its torch); an older or missing one is listed at our pin. Without it every pin is listed.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEVER = {"torch", "triton"}


def pins(extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    seen, out = set(), []
    for req in reqs:
        name = re.split(r"[\[=<>!~ ]", req, maxsplit=1)[0].lower()
        if name not in NEVER and name not in seen:
            seen.add(name)
            out.append(req)
    return out


def needed(req: str, keep_newer: bool) -> bool:
    if not keep_newer:
        return True
    from packaging.version import Version  # the GPU image has it; a bare venv never gets here

    name, _, want = req.partition("==")
    name = name.split("[")[0]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        return True
    return not want or Version(have) < Version(want)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="dev", help="comma-separated optional-dependency groups")
    parser.add_argument("--keep-newer", action="store_true")
    args = parser.parse_args()
    for req in pins([e for e in args.extras.split(",") if e]):
        if needed(req, args.keep_newer):
            print(req)


if __name__ == "__main__":
    main()
