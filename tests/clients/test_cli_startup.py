"""The `hotlora` console script as a user runs it: commands that need no model start without importing
torch or transformers (`hotlora --help` took 8.8 s when every command imported them), and a mistyped
option or command is refused with the closest real one before anything is parsed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOTLORA = str(Path(sys.executable).with_name("hotlora"))
HEAVY = ("torch", "transformers", "peft", "safetensors", "numpy", "ray", "triton", "fastapi", "uvicorn")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*argv: str, profile: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    if profile:
        env["PYTHONPROFILEIMPORTTIME"] = "1"  # every module imported, on stderr
    return subprocess.run([HOTLORA, *argv], capture_output=True, text=True, timeout=120, env=env)


def imported(stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")
    } - {"imported package"}


NO_MODEL = {
    "help": ["--help"],
    "version": ["--version"],
    "serve-help": ["serve", "--help"],
    "serve-fleet-help": ["serve-fleet", "--help"],
    "prepare-model-help": ["prepare-model", "--help"],
    "serve-bad-flag": ["serve", "--max-batch-size", "0"],
    "serve-typo": ["serve", "--max-batch-sise", "4"],
    "generate-help": ["generate", "--help"],
    "finetune-create-help": ["finetune", "create", "--help"],
    # client commands run their handler and call the server (here: nothing listens)
    "health": ["health", "--timeout", "2"],
    "generate": ["generate", "hello", "--timeout", "2"],
    "adapters-list": ["adapters", "list", "--timeout", "2"],
    "finetune-list": ["finetune", "list", "--timeout", "2"],
}


@pytest.mark.parametrize("argv", NO_MODEL.values(), ids=NO_MODEL.keys())
def test_commands_that_need_no_model_import_no_torch(argv):
    if argv[0] in ("health", "generate", "adapters", "finetune") and "--help" not in argv:
        argv = [*argv, "--address", f"127.0.0.1:{_closed_port()}"]
    t0 = time.monotonic()
    out = run(*argv, profile=True)
    seconds = time.monotonic() - t0
    modules = imported(out.stderr)
    assert "hotlora.clients.cli" in modules, out.stderr[-2000:]  # the profile was read
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"`hotlora {' '.join(argv)}` imported {heavy[:10]}"
    print(f"hotlora {' '.join(argv)}: {seconds:.2f} s, {len(modules)} modules, load {os.getloadavg()[0]:.1f}")


def test_the_profile_sees_torch_where_a_command_imports_it():
    """The check above can fail: the profile of a run that imports torch lists it."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import hotlora.server.app"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "torch" in imported(out.stderr)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["generate", "--adaptr", "support-bot", "hello"],
            "unrecognized option --adaptr; did you mean --adapter?",
        ),
        (
            ["generate", "--max-new-tokns=3", "hi"],
            "unrecognized option --max-new-tokns; did you mean --max-new-tokens?",
        ),
        (["embed", "--adaptr", "x", "text"], "did you mean --adapter?"),
        (["classify", "--adaptr", "x", "text"], "did you mean --adapter?"),
        (["health", "--servce", "x"], "did you mean --service?"),
        (["adapters", "upload", "dir", "--nmae", "x"], "did you mean --name?"),
        (["adapters", "list", "--prefx", "a"], "did you mean --prefix?"),
        (["adapters", "evaluate", "x", "--exmaples", "f"], "did you mean --examples?"),
        (["adapters", "load", "x", "--pn"], "did you mean --pin?"),
        (["finetune", "create", "--adaptr", "x"], "did you mean --adapter?"),
        (["finetune", "watch", "job", "--jsn"], "did you mean --json?"),
        (["serve", "--max-batch-sise", "4"], "did you mean --max-batch-size?"),
        (["serve", "--prot", "5"], "did you mean --port?"),
        (["serve-fleet", "--replicsa", "2"], "did you mean --replicas?"),
        (["prepare-model", "--cache-dri", "x"], "did you mean --cache-dir?"),
        (["generate", "--adress", "h:1", "hi"], "did you mean --address?"),
        (["adapter", "list"], "unknown command 'adapter'; did you mean adapters?"),
        (["adapters", "lsit"], "unknown command 'lsit'; did you mean list?"),
        (["finetune", "craete"], "did you mean create?"),
        (["generate", "--xyzzy", "hi"], "unrecognized option --xyzzy (see hotlora generate --help)"),
        (
            ["--address", "h:1", "generate", "hi"],
            "--address goes after the command (hotlora generate --address ...)",
        ),
        (
            ["--max-batch-size", "4", "serve"],
            "--max-batch-size goes after the command (hotlora serve --max-batch-size ...)",
        ),
        (["--verison"], "did you mean --version?"),
    ],
)
def test_a_typo_is_refused_with_the_closest_flag(argv, message):
    out = run(*argv)
    assert out.returncode == 2, out
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_mistyped_option_does_not_send_its_value_as_the_prompt():
    """Before: `generate --adaptr support-bot hello` parsed `support-bot` as the prompt and failed only on
    the extra word; with one word after it, it would have generated for the base model."""
    out = run("generate", "--adaptr", "support-bot", "--address", f"127.0.0.1:{_closed_port()}")
    assert out.returncode == 2 and "did you mean --adapter?" in out.stderr
    assert "UNAVAILABLE" not in out.stderr  # nothing was sent


def test_abbreviations_and_prompts_that_look_like_options_still_parse():
    from hotlora.clients.cli import build_parser

    p = build_parser()
    args = p.parse_args(["generate", "--adapt", "bot", "--max-new", "3", "--", "--not an option"])
    assert (args.adapter, args.max_new_tokens, args.prompt) == ("bot", 3, "--not an option")
    assert p.parse_args(["generate", "--- a prompt with spaces"]).prompt == "--- a prompt with spaces"
    assert p.parse_args(["serve", "--max-batch-size=4"]).max_batch_size == "4"


def test_a_misspelt_variable_is_named_with_the_real_one():
    """HOTLORA_MAX_BACH_SIZE would be ignored without a word; the variables hotlora or its tests read
    are not warned about."""
    from hotlora.clients.cli import misspelt_variables

    env = {
        "HOTLORA_MAX_BACH_SIZE": "4", "HOTLORA_ADRESS": "h:1", "HOTLORA_REPLICA": "2",
        "HOTLORA_PORT": "1", "HOTLORA_TOKEN": "t", "HOTLORA_TLS": "1", "HOTLORA_SOAK_SECONDS": "5",
        "HOTLORA_CRASH_TRIALS": "3", "HOTLORA_FUZZ_EXAMPLES": "9", "HOTLORA_ARGS": "",
        "HOTLORA_NOTHING_LIKE": "",
    }  # fmt: skip
    assert misspelt_variables(env) == [
        "warning: HOTLORA_ADRESS is not a hotlora setting; did you mean HOTLORA_ADDRESS?",
        "warning: HOTLORA_MAX_BACH_SIZE is not a hotlora setting; did you mean HOTLORA_MAX_BATCH_SIZE?",
        "warning: HOTLORA_REPLICA is not a hotlora setting; did you mean HOTLORA_REPLICAS?",
    ]
    out = subprocess.run(
        [HOTLORA, "serve", "--max-batch-size", "0"], capture_output=True, text=True, timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}, "HOTLORA_PROT": "5"},
    )  # fmt: skip
    assert "warning: HOTLORA_PROT is not a hotlora setting; did you mean HOTLORA_PORT?" in out.stderr
