"""The `hotlora` CLI's client commands, run in-process with `main([...])` against the fake server."""

import json
import socket
import sys
import types

import pytest

from hotlora import __version__
from hotlora.clients.cli import main
from hotlora.v1 import common_pb2, training_pb2
from tests.clients.conftest import CONFIG_BYTES, MODEL_BYTES
from tests.clients.fakes import MISSING


def test_generate_streams_text(fake, capsys):
    assert main(["generate", "hi", "--address", fake.address, "--token", "t", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out == "Hello, world\n"
    (req,) = fake.rec.requests("GenerateStream")
    assert req.prompt == "hi" and req.params.max_new_tokens == 5
    assert fake.rec.last_metadata()["authorization"] == "Bearer t"


def test_generate_chat_no_stream_and_json(fake, capsys):
    args = ["--address", fake.address, "--adapter", "bot", "--system", "be brief", "--stop", "a", "b"]
    assert main(["generate", "hello", "--no-stream", *args]) == 0
    assert capsys.readouterr().out == "echo: hello\n"
    assert main(["generate", "hello", "--json", "--seed", "4", *args]) == 0
    resp = json.loads(capsys.readouterr().out)
    assert resp["text"] == "echo: hello" and resp["finish_reason"] == "length" and resp["adapter"] == "bot@1"
    req = fake.rec.requests("Generate")[-1]
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "hello")]
    assert list(req.params.stop) == ["a", "b"] and req.params.seed == 4


def test_generate_prompt_from_stdin(fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(read=lambda: "from stdin"))
    assert main(["generate", "-", "--no-stream", "--address", fake.address]) == 0
    assert capsys.readouterr().out == "echo: from stdin\n"


def test_embed_and_classify(fake, capsys):
    assert main(["embed", "ab", "abc", "--address", fake.address]) == 0
    assert json.loads(capsys.readouterr().out)["embeddings"] == [[2.0, 0.5], [3.0, 0.5]]
    assert main(["classify", "good", "bad", "--adapter", "sentiment", "--address", fake.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["pos\t0.7500\t[neg 0.2500, pos 0.7500]"] * 2
    assert main(["classify", "good", "--adapter", "sentiment", "--json", "--address", fake.address]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["label"] == "pos"


def test_grpc_error_is_one_line_exit_1(fake, capsys):
    assert main(["adapters", "show", "missing", "--address", fake.address]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: NOT_FOUND: {MISSING}\n"
    assert main(["generate", "x", "--adapter", "missing", "--address", fake.address]) == 1
    assert capsys.readouterr().err == f"error: NOT_FOUND: {MISSING}\n"  # streaming path too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line(capsys):
    assert main(["adapters", "list", "--address", f"127.0.0.1:{_free_port()}", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ") and err.count("\n") == 1 and "Traceback" not in err


def test_health_exit_codes(fake, capsys):
    assert main(["health", "--address", fake.address]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    fake.set_health("NOT_SERVING")
    assert main(["health", "--address", fake.address]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"
    assert main(["health", "--address", f"127.0.0.1:{_free_port()}"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE")


def test_env_address_and_token(fake, capsys, monkeypatch):
    monkeypatch.setenv("HOTLORA_ADDRESS", fake.address)
    monkeypatch.setenv("HOTLORA_TOKEN", "from-env")
    assert main(["adapters", "list", "--json"]) == 0
    adapters = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["version"]) for a in adapters] == [("support-bot", 2), ("sentiment", 1)]
    assert adapters[1]["labels"] == ["neg", "pos"] and adapters[1]["state"] == "ADAPTER_STATE_DEVICE"
    assert fake.rec.last_metadata()["authorization"] == "Bearer from-env"
    assert main(["adapters", "list", "--token", "flag"]) == 0  # a flag beats the environment
    assert fake.rec.last_metadata()["authorization"] == "Bearer flag"


def test_adapters_list_table_and_filters(fake, capsys):
    assert main(["adapters", "list", "--prefix", "sup", "--all-versions", "--address", fake.address]) == 0
    out = capsys.readouterr().out
    assert "support-bot@2" in out and "CAUSAL_LM" in out and "sentiment" not in out
    req = fake.rec.requests("ListAdapters")[0]
    assert req.prefix == "sup" and req.all_versions


def test_adapters_commands(fake, capsys, peft_dir, tmp_path):
    a = ["--address", fake.address]
    assert main(["adapters", "upload", str(peft_dir), "--name", "bot", "--labels", "neg,pos", *a]) == 0
    assert capsys.readouterr().out.startswith("uploaded bot@1 (CAUSAL_LM")
    chunks = fake.adapters.uploads[0]
    assert chunks[0].name == "bot" and list(chunks[0].labels) == ["neg", "pos"]

    assert main(["adapters", "show", "bot@1", *a]) == 0
    assert "sha256" in capsys.readouterr().out
    assert main(["adapters", "load", "bot", "--pin", "--json", *a]) == 0
    assert json.loads(capsys.readouterr().out)["pinned"] is True
    assert main(["adapters", "unload", "bot", *a]) == 0
    assert "STORED" in capsys.readouterr().out
    assert main(["adapters", "delete", "bot@1", *a]) == 0
    assert capsys.readouterr().out == "deleted bot@1\n"

    fake.adapters.export_chunks = [
        common_pb2.FileChunk(filename="adapter_config.json", data=CONFIG_BYTES),
        common_pb2.FileChunk(filename="adapter_model.safetensors", data=MODEL_BYTES),
    ]
    assert main(["adapters", "export", "bot", str(tmp_path / "exp"), *a]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert (tmp_path / "exp" / "adapter_model.safetensors").read_bytes() == MODEL_BYTES


def test_upload_refused_client_side(fake, capsys, peft_dir):
    (peft_dir / "adapter_model.bin").write_bytes(b"x")
    assert main(["adapters", "upload", str(peft_dir), "--name", "bot", "--address", fake.address]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: adapter_model.bin (pickle) is not accepted") and err.count("\n") == 1
    assert fake.rec.calls == []


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_finetune_create_and_watch(fake, capsys, tmp_path):
    ex = _write_jsonl(
        tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": 0}]
    )
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "fine", "label": "pos"}])
    argv = [
        "finetune", "create", "--adapter", "sentiment", "--task", "seq_cls", "--examples", ex,
        "--validation", val, "--method", "LORA", "--labels", "0,pos", "--rank", "4", "--alpha", "8",
        "--learning-rate", "0.001", "--epochs", "3", "--batch-size", "2", "--target-modules", "q_proj,v_proj",
        "--layers", "2-4", "--promote", "ALWAYS", "--address", fake.address,
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    *progress, summary = captured.out.strip().splitlines()
    assert summary == "job job-1 SUCCEEDED: adapter sentiment@3 promoted (accuracy 0.9000 vs baseline 0.5000)"
    assert "step 4/4" in progress[-1]  # progress lines, on stdout: it is not a terminal here
    (req,) = fake.rec.requests("CreateFineTune")
    assert req.task == common_pb2.TASK_SEQ_CLS and req.method == training_pb2.METHOD_LORA
    assert req.promote == training_pb2.PROMOTE_ALWAYS and list(req.labels) == ["0", "pos"]
    assert [(e.text, e.label) for e in req.examples] == [("good", "pos"), ("bad", "0")]
    hp = req.hyperparameters
    assert (hp.rank, hp.epochs, hp.batch_size) == (4, 3, 2) and hp.alpha == pytest.approx(8.0)
    assert list(hp.target_modules) == ["q_proj", "v_proj"] and list(hp.layers_to_transform) == [2, 3, 4]
    assert not hp.HasField("seed")
    assert fake.rec.requests("WatchFineTune")[0].id == "job-1"


def test_finetune_no_watch_and_failed_watch(fake, capsys, tmp_path):
    ex = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    a = ["--address", fake.address]
    assert (
        main(
            [
                "finetune",
                "create",
                "--adapter",
                "m",
                "--task",
                "CAUSAL_LM",
                "--examples",
                ex,
                "--no-watch",
                *a,
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "job-1\n"
    assert fake.rec.requests("WatchFineTune") == []
    fake.training.final_state = "FAILED"
    assert main(["finetune", "watch", "job-1", *a]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("job job-1 FAILED: diverged (accuracy 0.9000")
    assert main(["finetune", "watch", "job-1", "--json", *a]) == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(events) == 5 and events[-1]["job"]["state"] == "JOB_STATE_FAILED"


def test_finetune_bad_examples_file(fake, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "b"}\nnot json\n')
    argv = ["finetune", "create", "--adapter", "m", "--task", "SEQ_CLS", "--examples", str(bad)]
    assert main([*argv, "--address", fake.address]) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad}:2: invalid JSON")
    assert fake.rec.calls == []


def test_finetune_list_show_cancel(fake, capsys):
    a = ["--address", fake.address]
    assert main(["finetune", "list", *a]) == 0
    assert "job-1" in capsys.readouterr().out
    assert main(["finetune", "show", "job-1", *a]) == 0
    assert "sentiment@3 (promoted)" in capsys.readouterr().out
    assert main(["finetune", "cancel", "job-1", *a]) == 0
    assert capsys.readouterr().out == "job job-1 CANCELLED\n"


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hotlora {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "embed", "classify", "health", "adapters", "finetune", "HOTLORA_ADDRESS"):
        assert command in out
    assert main([]) == 2
    assert main(["adapters"]) == 2


def test_server_commands_are_registered_when_available(monkeypatch, capsys):
    # the real module imported first, as the whole suite has by now: the fake below must still be the one used
    import hotlora.server.cli  # noqa: F401

    def register_commands(subparsers):
        p = subparsers.add_parser("serve", help="Run the server.")
        p.add_argument("--fake-only", action="store_true")  # the real serve refuses it (exit 2), never serves
        p.set_defaults(func=lambda args: 7 if args.fake_only else 0)

    monkeypatch.setitem(
        sys.modules, "hotlora.server.cli", types.SimpleNamespace(register_commands=register_commands)
    )
    assert main(["serve", "--fake-only"]) == 7
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out
