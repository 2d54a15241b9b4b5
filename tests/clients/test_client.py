"""The sync Client against fake servicers on a real gRPC server."""

import subprocess
import sys

import grpc
import pytest

from hotlora.clients import Client, ClientError
from hotlora.v1 import adapters_pb2, common_pb2, training_pb2
from tests.clients.conftest import CONFIG_BYTES, MODEL_BYTES
from tests.clients.fakes import FakeInference

WAIT = 120  # a bound that only a hung call reaches; the tests wait on the server's events


def test_bearer_token_sent_on_every_kind_of_call(fake, peft_dir, tmp_path):
    fake.adapters.export_chunks = [common_pb2.FileChunk(filename="adapter_config.json", data=b"{}")]
    with Client(fake.address, token="s3cret") as c:
        c.generate("hi")
        list(c.generate_stream("hi"))
        c.upload_adapter(peft_dir, "a")
        c.export_adapter("a", tmp_path / "out")
        list(c.watch_finetune("job-1"))
        assert c.health() == "SERVING"
    assert len(fake.rec.calls) == 5
    for method, _, md in fake.rec.calls:
        assert md.get("authorization") == "Bearer s3cret", method


def test_no_token_no_authorization_metadata(fake):
    with Client(fake.address) as c:
        c.list_adapters()
    assert "authorization" not in fake.rec.last_metadata()


def test_generate_request_fields(fake):
    with Client(fake.address) as c:
        resp = c.generate(
            "hello", adapter="bot@2", max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=0,
            stop=["\n"], request_id="r1",
        )  # fmt: skip
        c.generate(messages=[{"role": "system", "content": "be brief"}, ("user", "hi")])
    assert resp.text == "echo: hello" and resp.adapter == "bot@2@1" and resp.request_id == "r1"
    first, second = fake.rec.requests("Generate")
    assert first.adapter == "bot@2" and first.prompt == "hello"
    p = first.params
    assert (p.max_new_tokens, p.top_k, list(p.stop)) == (7, 40, ["\n"])
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert p.HasField("seed") and p.seed == 0
    assert not second.params.HasField("seed")
    assert [(m.role, m.content) for m in second.messages] == [("system", "be brief"), ("user", "hi")]


def test_generate_needs_exactly_one_of_prompt_and_messages(fake):
    with Client(fake.address) as c:
        with pytest.raises(ClientError):
            c.generate()
        with pytest.raises(ClientError):
            c.generate("x", messages=[{"role": "user", "content": "y"}])
    assert fake.rec.calls == []


def test_server_status_is_raised_as_rpc_error(fake):
    with Client(fake.address) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("x", adapter="missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in err.value.details()


def test_default_timeout_is_a_deadline(fake):
    with Client(fake.address, timeout=0.2) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("slow")
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_generate_stream_yields_chunks(fake):
    with Client(fake.address) as c:
        chunks = list(c.generate_stream("hi"))
    assert "".join(ch.text for ch in chunks) == "".join(FakeInference.STREAM_TEXT)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 3


def test_closing_generate_stream_cancels_server_side(fake):
    with Client(fake.address) as c:
        stream = c.generate_stream("forever")
        got = [next(stream) for _ in range(3)]
        assert [ch.text for ch in got] == ["t0 ", "t1 ", "t2 "]
        stream.close()
        call = fake.inference.streams["forever"]
        assert call.ended.wait(WAIT), "server never saw the cancellation"
        assert call.context.is_active() is False
        with pytest.raises(grpc.RpcError) as err:
            for _ in range(1000):
                next(stream)
        assert err.value.code() == grpc.StatusCode.CANCELLED


def test_leaving_with_block_cancels_stream(fake):
    with Client(fake.address) as c:
        with c.generate_stream("forever") as stream:
            for chunk in stream:
                if chunk.token_ids[0] == 2:
                    break
        call = fake.inference.streams["forever"]
        assert call.ended.wait(WAIT)
        assert call.context.is_active() is False


def test_embed_and_classify(fake):
    with Client(fake.address) as c:
        emb = c.embed(["ab", "abcd"], adapter="e")
        cls = c.classify("good", adapter="sentiment")
    assert [list(e.values) for e in emb.embeddings] == [[2.0, 0.5], [4.0, 0.5]]
    assert cls.results[0].label == "pos" and [s.label for s in cls.results[0].scores] == ["neg", "pos"]
    assert list(fake.rec.requests("Classify")[0].texts) == ["good"]


# ------------------------------------------------------------------------------------------------ upload


@pytest.mark.parametrize("chunk_size", [1000, 2500, 4096])
def test_upload_chunk_sequence(fake, peft_dir, chunk_size):
    progress = []
    with Client(fake.address) as c:
        adapter = c.upload_adapter(
            peft_dir, "support-bot", description="d", labels=["neg", "pos"], chunk_size=chunk_size,
            progress=lambda sent, total: progress.append((sent, total)),
        )  # fmt: skip
    assert adapter.name == "support-bot" and list(adapter.labels) == ["neg", "pos"]
    (chunks,) = fake.adapters.uploads
    first, rest = chunks[0], chunks[1:]
    assert (first.name, first.description, list(first.labels)) == ("support-bot", "d", ["neg", "pos"])
    assert first.filename == "" and first.data == b""
    assert all(ch.name == "" and not ch.labels and ch.filename for ch in rest)
    assert all(len(ch.data) <= chunk_size for ch in rest)
    assert [ch.filename for ch in rest][0] == "adapter_config.json"  # config first, then the weights
    files: dict[str, bytes] = {}
    for ch in rest:
        files[ch.filename] = files.get(ch.filename, b"") + ch.data
    assert files == {"adapter_config.json": CONFIG_BYTES, "adapter_model.safetensors": MODEL_BYTES}
    expected_model_chunks = -(-len(MODEL_BYTES) // chunk_size)
    assert sum(ch.filename == "adapter_model.safetensors" for ch in rest) == expected_model_chunks
    total = len(CONFIG_BYTES) + len(MODEL_BYTES)
    assert progress[0] == (0, total) and progress[-1] == (total, total)


def test_upload_ignores_peft_readme(fake, peft_dir):
    (peft_dir / "README.md").write_text("model card")
    with Client(fake.address) as c:
        c.upload_adapter(peft_dir, "a")
    assert {ch.filename for ch in fake.adapters.uploads[0][1:]} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: (d / "notes.txt").write_text("x"), "notes.txt"),
        (lambda d: (d / "adapter_model.bin").write_bytes(b"pickle"), "pickle"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "lacks adapter_model.safetensors"),
        (lambda d: (d / "tokenizer").mkdir(), "tokenizer"),
    ],
)
def test_upload_refuses_non_peft_directories_client_side(fake, peft_dir, setup, message):
    setup(peft_dir)
    with Client(fake.address) as c, pytest.raises(ClientError, match=message):
        c.upload_adapter(peft_dir, "a")
    assert fake.adapters.uploads == []


def test_upload_of_a_model_directory_says_it_is_a_model_not_an_adapter(fake, tmp_path):
    from tests.tiny import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")  # config.json, model.safetensors, tokenizer files
    with Client(fake.address) as c, pytest.raises(ClientError) as err:
        c.upload_adapter(model, "a")
    message = str(err.value)
    assert "is a model directory (config.json" in message and "not a PEFT adapter" in message
    assert "hotlora serve --model" in message and "not part of" not in message
    assert fake.adapters.uploads == []


def test_the_client_and_the_server_call_the_same_files_a_models():
    from hotlora.adapters.peft.files import model_files
    from hotlora.clients._common import _is_model_file

    names = [
        *["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"],
        *["pytorch_model.bin", "pytorch_model.bin.index.json", "model-00001-of-00002.safetensors"],
        *["pytorch_model-00001-of-00002.bin", "m-Q4_0.gguf", "tokenizer.json", "README.md"],
        *["adapter_config.json", "adapter_model.safetensors", "head_config.json", "model-card.md"],
    ]
    assert sorted(n for n in names if _is_model_file(n)) == model_files(names) == sorted(names[:9])


def test_upload_sends_an_exported_heads_head_config(fake, peft_dir):
    (peft_dir / "head_config.json").write_text('{"pooling": "mean", "layer": -1}')
    (peft_dir / "README.md").write_text("how to load it")  # what an export of such a head carries
    with Client(fake.address) as c:
        c.upload_adapter(peft_dir, "a")
    sent = [ch.filename for ch in fake.adapters.uploads[0][1:]]
    assert sorted(set(sent)) == ["adapter_config.json", "adapter_model.safetensors", "head_config.json"]


def test_upload_refuses_a_file_path(fake, peft_dir):
    with Client(fake.address) as c, pytest.raises(ClientError, match="not a directory"):
        c.upload_adapter(peft_dir / "adapter_config.json", "a")


# ------------------------------------------------------------------------------------------------ export


def _export_chunks(files: dict[str, bytes], size: int) -> list[common_pb2.FileChunk]:
    out = []
    for name, data in files.items():
        out += [
            common_pb2.FileChunk(filename=name, data=data[i : i + size]) for i in range(0, len(data), size)
        ]
    return out


def test_export_writes_byte_identical_files(fake, tmp_path):
    files = {"adapter_config.json": CONFIG_BYTES, "adapter_model.safetensors": MODEL_BYTES}
    fake.adapters.export_chunks = _export_chunks(files, 700)
    dest = tmp_path / "new" / "dir"
    with Client(fake.address) as c:
        paths = c.export_adapter("support-bot@2", dest)
    assert sorted(p.name for p in paths) == sorted(files)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert fake.rec.requests("ExportAdapter")[0].name == "support-bot@2"


@pytest.mark.parametrize("bad", ["../evil", "/etc/passwd", "a/b", "..", "", "a\\b", "C:evil"])
def test_export_refuses_unsafe_filenames(fake, tmp_path, bad):
    fake.adapters.export_chunks = [
        common_pb2.FileChunk(filename="adapter_config.json", data=b"{}"),
        common_pb2.FileChunk(filename=bad, data=b"owned"),
    ]
    dest = tmp_path / "out"
    with Client(fake.address) as c, pytest.raises(ClientError, match="unsafe filename"):
        c.export_adapter("a", dest)
    assert list(dest.iterdir()) == []  # no partial files either
    assert not (tmp_path / "evil").exists()


def test_export_failure_midway_leaves_nothing(fake, tmp_path):
    fake.adapters.export_chunks = _export_chunks({"adapter_model.safetensors": MODEL_BYTES}, 500)
    fake.adapters.export_abort_after = 2
    dest = tmp_path / "out"
    with Client(fake.address) as c, pytest.raises(grpc.RpcError) as err:
        c.export_adapter("a", dest)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert list(dest.iterdir()) == []


def test_adapter_crud(fake):
    with Client(fake.address) as c:
        listed = c.list_adapters(prefix="sent", all_versions=True)
        got = c.get_adapter("support-bot@2")
        loaded = c.load_adapter("sentiment", pin=True)
        unloaded = c.unload_adapter("sentiment")
        ack = c.delete_adapter("sentiment@1")
    assert [a.name for a in listed.adapters] == ["sentiment"]
    req = fake.rec.requests("ListAdapters")[0]
    assert req.prefix == "sent" and req.all_versions
    assert got.name == "support-bot"
    assert loaded.pinned and loaded.state == adapters_pb2.ADAPTER_STATE_DEVICE
    assert fake.rec.requests("LoadAdapter")[0].pin is True
    assert unloaded.state == adapters_pb2.ADAPTER_STATE_STORED
    assert ack.message == "deleted sentiment@1"


# ------------------------------------------------------------------------------------------------ training


def test_create_finetune_maps_friendly_names(fake):
    with Client(fake.address) as c:
        job = c.create_finetune(
            "sentiment", "seq_cls", [{"text": "good", "label": 1}, {"text": "bad", "label": "0"}],
            validation=[{"text": "ok", "label": 1}], method="lora", labels=["0", "1"], promote="ALWAYS",
            hyperparameters={"rank": 4, "lr": 1e-3, "layers": "2,3", "target_modules": ["q_proj"], "seed": 7},
        )  # fmt: skip
    assert job.id == "job-1"
    (req,) = fake.rec.requests("CreateFineTune")
    assert req.task == common_pb2.TASK_SEQ_CLS
    assert req.method == training_pb2.METHOD_LORA
    assert req.promote == training_pb2.PROMOTE_ALWAYS
    assert [(e.text, e.label) for e in req.examples] == [("good", "1"), ("bad", "0")]
    assert req.validation[0].text == "ok"
    hp = req.hyperparameters
    assert hp.rank == 4 and hp.learning_rate == pytest.approx(1e-3) and hp.seed == 7
    assert list(hp.layers_to_transform) == [2, 3] and list(hp.target_modules) == ["q_proj"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "CLASSIFY"}, "unknown task 'CLASSIFY'; allowed: CAUSAL_LM, SEQ_CLS"),
        ({"method": "FULL"}, "unknown method"),
        ({"examples": [{"text": "x", "lable": "y"}]}, "unknown example keys"),
        ({"examples": [{"text": "x"}]}, "needs text and label"),
        ({"examples": []}, "no training examples"),
        ({"hyperparameters": {"dropout": 0.1}}, "unknown hyper-parameter 'dropout'"),
    ],
)
def test_create_finetune_refuses_bad_arguments(fake, kwargs, message):
    args = {"task": "SEQ_CLS", "examples": [{"text": "x", "label": "y"}]} | kwargs
    with Client(fake.address) as c, pytest.raises(ClientError, match=message):
        c.create_finetune("a", args.pop("task"), args.pop("examples"), **args)
    assert fake.rec.calls == []


def test_watch_and_job_calls(fake):
    with Client(fake.address) as c:
        events = list(c.watch_finetune("job-1"))
        assert c.get_finetune("job-1").result_adapter == "sentiment@3"
        assert len(c.list_finetunes().jobs) == 1
        assert c.cancel_finetune("job-1").state == training_pb2.JOB_STATE_CANCELLED
    assert [e.job.metrics.step for e in events] == [1, 2, 3, 4, 4]
    assert events[-1].job.state == training_pb2.JOB_STATE_SUCCEEDED


# ------------------------------------------------------------------------------------------------ health


def test_health(fake):
    with Client(fake.address) as c:
        assert c.health() == "SERVING"
        fake.set_health("NOT_SERVING")
        assert c.health() == "NOT_SERVING"
        fake.set_health("SERVING", "hotlora.v1.Inference")
        assert c.health("hotlora.v1.Inference") == "SERVING"


def test_health_without_grpc_health_package(fake, monkeypatch):
    """A client-only install lacks grpcio-health-checking: the hand-written codec answers the same."""
    from hotlora.clients import _health

    monkeypatch.setitem(sys.modules, "grpc_health.v1", None)
    assert _health.codec()[1] is _health._encode_request
    with Client(fake.address) as c:
        assert c.health() == "SERVING"
        fake.set_health("NOT_SERVING", "hotlora.v1.Inference")
        assert c.health("hotlora.v1.Inference") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            c.health("no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_module_does_not_import_torch_or_server():
    code = (
        "import sys, hotlora.clients, hotlora.clients.cli; "
        "heavy = ('torch', 'hotlora.server', 'hotlora.adapters', 'hotlora.kernels'); "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(heavy[1:])]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    # the parser imports hotlora.server.cli when present; only importing the modules must stay light
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ TLS


def _self_signed(tmp_path, name):
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


def test_mutual_tls(tmp_path):
    import shutil

    from tests.clients.fakes import start_fake_server

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    skey, scert = _self_signed(tmp_path, "server")
    ckey, ccert = _self_signed(tmp_path, "client")
    creds = grpc.ssl_server_credentials(
        [(skey.read_bytes(), scert.read_bytes())],
        root_certificates=ccert.read_bytes(),
        require_client_auth=True,
    )
    server = start_fake_server(credentials=creds)
    try:
        address = f"localhost:{server.address.rsplit(':', 1)[1]}"
        with Client(
            address, root_certificates=scert, private_key=ckey, certificate_chain=ccert, timeout=60
        ) as c:
            assert c.list_adapters().adapters
        with Client(address, root_certificates=scert, timeout=10) as c, pytest.raises(grpc.RpcError):
            c.list_adapters()  # no client certificate: the handshake is refused
    finally:
        server.stop()


def test_tls_arguments_checked():
    with pytest.raises(ClientError, match="both"):
        Client(private_key=b"key")
    with pytest.raises(ClientError, match="cannot read"):
        Client(root_certificates="/nonexistent/ca.pem")
