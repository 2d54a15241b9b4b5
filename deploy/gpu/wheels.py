"""The wheels a GPU host with no package index needs, carried in `.whl/` (git-ignored) beside the code.

    python deploy/gpu/wheels.py download [--dest .whl]   # here (make gpu-wheels): fill .whl, check budget
    python3 deploy/gpu/wheels.py install --target DIR    # there (device-check.sh): what the image lacks
    python3 deploy/gpu/wheels.py shim --target DIR       # there: `import hotlora` from this checkout

`download` takes hotlora's core dependencies (pyproject.toml) and, from each wheel's own requirements, the
packages they need in turn, and keeps what the device image may not satisfy: a package it lacks, or one
whose version there is unknown or too old for a requirement with a lower bound. torch and triton are never
carried: the project runs on the image's CUDA builds. Versions: our pin, else the one this .venv runs,
else the newest that fits. Wheels are manylinux x86-64 for CPython 3.12 (`pip download --only-binary`).
It then checks that the code and the wheels fit the 64 MiB a device call carries.

`install` puts into DIR (a PYTHONPATH entry, ahead of the image's packages) each carried wheel whose
package the running interpreter lacks or has in an older version, with no index and no dependencies.
`shim` writes DIR/hotlora/__init__.py whose package path is this checkout's folders, the mapping
pyproject.toml declares (hotlora.server = server/, ...), so nothing is built or installed for hotlora.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 64 << 20  # what one device call carries: the working tree and carried paths together
MARGIN = 4 << 20  # room for logs, results and files added before the call
NEVER = {"torch", "triton"}  # the image's CUDA builds
# the device image ('cuda', /work/.library/device/KINDS.md, read 2026-11): versions where recorded
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
IMAGE_PACKAGES = set(IMAGE_VERSIONS) | set(
    """absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
    charset-normalizer click cloudpickle cmake colorama coverage cython einops filelock frozenlist fsspec
    grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna iniconfig jinja2 joblib lxml markdown
    markdown-it-py markupsafe mdurl mpmath msgpack multidict networkx ninja nvidia-ml-py packaging pandas
    peft pillow pip pluggy prometheus-client propcache protobuf psutil pygments pyparsing pytest
    pytest-timeout pytest-xdist python-dateutil pyyaml regex requests rich setuptools shellingham six
    sympy tqdm typer typing-extensions urllib3 wheel yarl zipp""".split()
)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- here: which wheels, and fetching them ------------------------------------------------------------
def core_requirements() -> list[str]:
    """pyproject.toml's dependencies; grpcio-tools (its dev pin): the device generates the gRPC stubs
    (`make proto`), which are git-ignored and do not travel; and the build requirements, for `make
    setup-gpu WHEELS=.whl`'s editable install."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    tools = [r for r in project["optional-dependencies"]["dev"] if r.startswith("grpcio-tools")]
    return list(project["dependencies"]) + tools + list(pyproject["build-system"]["requires"])


def image_satisfies(name: str, specifier) -> bool:
    """Whether the image's package surely meets `specifier` (a packaging SpecifierSet). Our own pins (==)
    are met by the image's version or a newer one, as `make setup-gpu SYSTEM_TORCH=1` keeps them (the
    image's packages are built and tested with its torch)."""
    from packaging.version import Version

    if name in IMAGE_VERSIONS:
        have = Version(IMAGE_VERSIONS[name])
        pins = [Version(s.version) for s in specifier if s.operator == "=="]
        if pins:
            return have >= pins[0]
        return specifier.contains(have, prereleases=True)
    return name in IMAGE_PACKAGES and not str(specifier)  # unknown version: only an unbounded need is met


def choose_version(req) -> str | None:
    """Our pin, else this environment's version if it fits, else None (the newest that fits)."""
    pinned = [s.version for s in req.specifier if s.operator == "=="]
    if pinned:
        return pinned[0]
    try:
        have = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return None
    return have if req.specifier.contains(have, prereleases=True) else None


def wheel_requirements(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel that apply to CPython 3.12 on Linux with no extras."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}  # fmt: skip
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(str(req))
    return out


def pip_download(spec: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), spec]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True)
    new = set(dest.glob("*.whl")) - before
    if new:
        return new.pop()
    name = normalize(spec.split("=")[0].split("<")[0].split(">")[0])
    return next(p for p in dest.glob("*.whl") if normalize(p.name.split("-")[0]) == name)  # already there


def download(dest: Path) -> list[Path]:
    """Fill `dest` with the closure of the core requirements the image may not satisfy."""
    from packaging.requirements import Requirement

    dest.mkdir(parents=True, exist_ok=True)
    todo = [Requirement(r) for r in core_requirements()]
    taken: dict[str, Path] = {}
    while todo:
        req = todo.pop(0)
        name = normalize(req.name)
        if name in NEVER or name in taken or image_satisfies(name, req.specifier):
            continue
        version = choose_version(req)
        path = pip_download(f"{req.name}=={version}" if version else str(req), dest)
        taken[name] = path
        todo += [Requirement(r) for r in wheel_requirements(path)]
    for stale in set(dest.glob("*.whl")) - set(taken.values()):
        stale.unlink()  # a wheel of an earlier version or a dropped need
    (dest / "MANIFEST.txt").write_text("".join(f"{p.name}\n" for p in sorted(taken.values())))
    return sorted(taken.values())


def tree_bytes() -> int:
    """Bytes of what a device call sends besides .whl: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout  # fmt: skip
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def check_budget(wheels: list[Path]) -> int:
    """Print the sizes; returns the bytes left under the budget (negative: over)."""
    code = tree_bytes()
    whl = sum(p.stat().st_size for p in wheels)
    for p in sorted(wheels, key=lambda p: -p.stat().st_size):
        print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
    left = BUDGET - MARGIN - code - whl
    print(
        f"code {code / 2**20:.1f} MiB + wheels {whl / 2**20:.1f} MiB = {(code + whl) / 2**20:.1f} MiB of "
        f"{BUDGET / 2**20:.0f} MiB ({MARGIN / 2**20:.0f} MiB kept free): {left / 2**20:.1f} MiB left"
    )
    return left


# ---- there: installing what the image lacks, and the hotlora package ----------------------------------
def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def needed_wheels(wheel_dir: Path, installed=None) -> list[Path]:
    """The carried wheels whose package is missing here or older than the wheel (never torch/triton)."""
    from packaging.version import Version

    installed = installed or _installed_version
    out = []
    for path in sorted(wheel_dir.glob("*.whl")):
        name, version = wheel_name_version(path)
        if name in NEVER:
            raise SystemExit(f"{path.name}: torch and triton are never carried (the image's CUDA builds)")
        have = installed(name)
        if have is None or Version(have) < Version(version):
            out.append(path)
    return out


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install(wheel_dir: Path, target: Path | None) -> None:
    """Into `target` (a PYTHONPATH entry), or into this interpreter's environment (a venv: make setup-gpu)."""
    wheels = needed_wheels(wheel_dir) if wheel_dir.is_dir() else []
    if not wheels:
        print(f"nothing to install from {wheel_dir}: this interpreter has every carried package")
        return
    print("installing", " ".join(p.name for p in wheels), "into", target or sys.prefix, flush=True)
    into = ["--target", str(target), "--upgrade"] if target is not None else []
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", *into, *map(str, wheels)],
        check=True,
    )  # fmt: skip


def shim(target: Path, root: Path = ROOT) -> Path:
    """target/hotlora/__init__.py: the package `hotlora` whose subpackages are this checkout's folders
    (pyproject.toml's package-dir: hotlora.server = server/, hotlora.v1 = gen/hotlora/v1, ...), as an
    editable install maps them."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    dirs = pyproject["tool"]["setuptools"]["package-dir"]
    paths = [str(root / dirs["hotlora"])]
    for name, folder in dirs.items():
        if name.count(".") != 1:
            continue  # deeper packages live inside their parent's folder
        where = root / folder
        if where.name != name.split(".")[1]:
            raise SystemExit(f"{name} = {folder}: a shim maps a subpackage to a folder of its own name only")
        if str(where.parent) not in paths:
            paths.append(str(where.parent))
    pkg = target / "hotlora"
    pkg.mkdir(parents=True, exist_ok=True)
    init = pkg / "__init__.py"
    init.write_text(
        '"""hotlora from a checkout (written by deploy/gpu/wheels.py shim)."""\n\n'
        f"__path__ = {paths!r}\n__version__ = {pyproject['project']['version']!r}\n"
    )
    return init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fill the wheel folder here and check the budget")
    d.add_argument("--dest", type=Path, default=ROOT / ".whl")
    i = sub.add_parser("install", help="install the carried wheels this interpreter needs")
    i.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    i.add_argument("--target", type=Path, help="a folder for PYTHONPATH (default: this environment)")
    s = sub.add_parser("shim", help="write the hotlora package that maps this checkout")
    s.add_argument("--target", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "download":
        wheels = download(args.dest)
        if check_budget(wheels) < 0:
            raise SystemExit("over the device call's 64 MiB: carry fewer wheels or shrink the tree")
    elif args.cmd == "install":
        install(args.wheels, args.target)
    else:
        print(shim(args.target))


if __name__ == "__main__":
    main()
