"""The `hotlora` command line against a live server: adapters upload / list / show / export / load /
unload / delete, `generate --adapter` and `classify --adapter`, exactly as a user types them."""

from __future__ import annotations

import json

import pytest

from hotlora.clients.cli import main
from hotlora.v1 import common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter
from tests.server.harness import running_server

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("data"), adapter_slots=2, max_rank=16) as r:
        yield r


@pytest.fixture
def hl(run, capsys, monkeypatch):
    """Run `hotlora ARGS --address ...`; returns (exit code, stdout, stderr)."""
    for var in ("HOTLORA_ADDRESS", "HOTLORA_TOKEN"):
        monkeypatch.delenv(var, raising=False)

    def call(*args: str):
        capsys.readouterr()
        code = main([*args, "--address", run.address])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_adapter_lifecycle_through_the_cli(run, hl, tmp_path):
    d = make_peft_adapter(tmp_path / "peft", seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    code, out, err = hl("adapters", "upload", str(d), "--name", "cli-bot")
    assert code == 0, err
    assert "uploaded cli-bot@1" in out and "rank 4" in out

    code, out, _ = hl("adapters", "list", "--json")
    assert code == 0
    assert [(a["name"], int(a["version"])) for a in json.loads(out)] == [("cli-bot", 1)]

    code, out, _ = hl("adapters", "show", "cli-bot", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["name"] == "cli-bot" and int(shown["rank"]) == 4

    code, out, err = hl("adapters", "export", "cli-bot", str(tmp_path / "out"))
    assert code == 0, err
    for f in FILES:
        assert (tmp_path / "out" / f).read_bytes() == (d / f).read_bytes()

    code, out, _ = hl("adapters", "load", "cli-bot", "--pin", "--json")
    loaded = json.loads(out)
    assert code == 0 and loaded["state"].endswith("DEVICE") and loaded["pinned"] is True

    code, out, _ = hl("adapters", "unload", "cli-bot", "--json")
    unloaded = json.loads(out)
    assert code == 0 and unloaded["state"].endswith("STORED") and not unloaded.get("pinned", False)

    # generate --adapter prints what the server's Generate returns, and differs from the base model
    want = run.inference.Generate(
        inference_pb2.GenerateRequest(
            prompt="hi there", adapter="cli-bot", params=common_pb2.SamplingParams(max_new_tokens=8)
        ),
        timeout=60,
    )
    base = run.inference.Generate(inference_pb2.GenerateRequest(
        prompt="hi there", params=common_pb2.SamplingParams(max_new_tokens=8)), timeout=60)  # fmt: skip
    assert want.token_ids != base.token_ids
    code, out, _ = hl("generate", "hi there", "--adapter", "cli-bot", "--max-new-tokens", "8", "--json")
    assert code == 0
    resp = json.loads(out)
    assert [int(t) for t in resp["token_ids"]] == list(want.token_ids) and resp["adapter"] == "cli-bot@1"
    code, out, _ = hl("generate", "hi there", "--adapter", "cli-bot", "--max-new-tokens", "8")
    assert code == 0 and out == want.text + "\n"  # streamed

    code, out, _ = hl("adapters", "delete", "cli-bot")
    assert code == 0 and "cli-bot@1" in out
    code, out, err = hl("adapters", "show", "cli-bot")
    assert code == 1 and err.startswith("error: NOT_FOUND:") and "cli-bot" in err
    code, _, err = hl("generate", "hi", "--adapter", "cli-bot")
    assert code == 1 and "NOT_FOUND" in err


def test_classify_through_the_cli(run, hl, tmp_path):
    d = make_peft_adapter(
        tmp_path / "cls", seed=9, task="SEQ_CLS", num_labels=3, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    code, out, err = hl("adapters", "upload", str(d), "--name", "cli-cls", "--labels", "neg,neu,pos")
    assert code == 0, err
    want = run.inference.Classify(
        inference_pb2.ClassifyRequest(adapter="cli-cls", texts=["great", "awful"]), timeout=60
    )
    code, out, _ = hl("classify", "great", "awful", "--adapter", "cli-cls", "--json")
    assert code == 0
    got = json.loads(out)["results"]
    assert [r["label"] for r in got] == [r.label for r in want.results]
    assert [s["label"] for s in got[0]["scores"]] == ["neg", "neu", "pos"]
    code, out, _ = hl("classify", "great", "--adapter", "cli-cls")
    assert code == 0 and out.startswith(want.results[0].label + "\t")


def test_bad_upload_prints_the_servers_reason(hl, tmp_path):
    d = make_peft_adapter(tmp_path / "r32", seed=3, r=32, lora_alpha=8, target_modules=["q_proj"])
    code, _, err = hl("adapters", "upload", str(d), "--name", "too-big")
    assert code == 1 and "RESOURCE_EXHAUSTED" in err and "rank" in err
    code, _, err = hl("adapters", "upload", str(d), "--name", "Bad/Name")
    assert code == 1 and "name" in err.lower()
