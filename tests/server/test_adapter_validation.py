"""Bad adapter uploads over gRPC: each is refused with the right status and a message that names the
problem, and the registry is left exactly as it was (no listed version, no new blob file)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hotlora.v1 import adapters_pb2, common_pb2
from tests.server.adapter_utils import make_peft_adapter
from tests.server.harness import running_server

MAX_UPLOAD = 64 * 1024  # small, so an oversized upload is cheap to send
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

INVALID, PRECONDITION, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, bytes]:
    d = make_peft_adapter(
        tmp_path_factory.mktemp("good"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    return {CONFIG: (d / CONFIG).read_bytes(), WEIGHTS: (d / WEIGHTS).read_bytes()}


@pytest.fixture(scope="module")
def big_rank(tmp_path_factory) -> dict[str, bytes]:
    d = make_peft_adapter(
        tmp_path_factory.mktemp("r32"), seed=2, r=32, lora_alpha=8, target_modules=["q_proj"]
    )
    return {CONFIG: (d / CONFIG).read_bytes(), WEIGHTS: (d / WEIGHTS).read_bytes()}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(
        tiny_model_dir, tmp_path_factory.mktemp("data"), max_rank=16, max_upload_bytes=MAX_UPLOAD
    ) as run:
        yield run


# ---- ways to break a good adapter ---------------------------------------------------------------------


def _tensors(files):
    return dict(st_load(files[WEIGHTS]))


def _with_tensors(files, tensors):
    return {**files, WEIGHTS: st_save(tensors, metadata={"format": "pt"})}


def _with_config(files, **changes):
    cfg = json.loads(files[CONFIG])
    cfg.update(changes)
    return {**files, CONFIG: json.dumps(cfg).encode()}


def wrong_in_features(f):
    t = _tensors(f)
    t[A_KEY] = torch.randn(t[A_KEY].shape[0], t[A_KEY].shape[1] + 3)
    return _with_tensors(f, t)


def b_rank_mismatch(f):
    t = _tensors(f)
    t[B_KEY] = torch.randn(t[B_KEY].shape[0], t[B_KEY].shape[1] + 1)
    return _with_tensors(f, t)


def missing_lora_b(f):
    t = _tensors(f)
    del t[B_KEY]
    return _with_tensors(f, t)


def nan_value(f):
    t = _tensors(f)
    t[A_KEY][0, 0] = float("nan")
    return _with_tensors(f, t)


def inf_value(f):
    t = _tensors(f)
    t[B_KEY][1, 1] = float("inf")
    return _with_tensors(f, t)


def int_tensor(f):
    t = _tensors(f)
    t[A_KEY] = torch.ones_like(t[A_KEY], dtype=torch.int32)
    return _with_tensors(f, t)


def pickle_bin(f):
    return {CONFIG: f[CONFIG], "adapter_model.bin": f[WEIGHTS]}


def unknown_module_tensor(f):
    t = _tensors(f)
    t["base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight"] = torch.randn(4, 64)
    t["base_model.model.model.layers.0.self_attn.foo_proj.lora_B.weight"] = torch.randn(64, 4)
    return _with_tensors(f, t)


def unknown_target(f):
    return _with_config(f, target_modules=["foo_proj"])


def layer_out_of_range(f):
    return _with_config(f, layers_to_transform=[7])


def dora(f):
    return _with_config(f, use_dora=True)


def bias_training(f):
    return _with_config(f, bias="all")


def not_lora(f):
    return _with_config(f, peft_type="IA3")


def truncated_data(f):
    return {**f, WEIGHTS: f[WEIGHTS][: len(f[WEIGHTS]) // 2]}


def truncated_header(f):
    return {**f, WEIGHTS: f[WEIGHTS][:20]}


def garbage_config(f):
    return {**f, CONFIG: b"{not json"}


def missing_weights(f):
    return {CONFIG: f[CONFIG]}


def unexpected_file(f):
    return {**f, "run.sh": b"rm -rf /"}


def oversized(f):
    return {**f, "README.md": b"x" * (MAX_UPLOAD + 1)}


def model_weights(f):
    # a model's directory, weights over the upload limit: named a model at its first chunk, not "too large"
    return {"config.json": b"{}", "model.safetensors": b"x" * (MAX_UPLOAD + 1)}


def unchanged(f):
    return f  # the mistake is elsewhere (labels in the first chunk)


# (id, how to break the good adapter, statuses allowed, words the message must contain, labels)
CASES = [
    ("wrong-shape", wrong_in_features, {PRECONDITION}, ["q_proj", "64"], ()),
    ("rank-mismatch", b_rank_mismatch, {INVALID}, ["lora_B"], ()),
    ("missing-tensor", missing_lora_b, {INVALID}, ["lacks", "lora_B"], ()),
    ("nan", nan_value, {INVALID}, ["NaN"], ()),
    ("inf", inf_value, {INVALID}, ["infinite"], ()),
    ("int-dtype", int_tensor, {INVALID}, ["dtype"], ()),
    ("pickle-bin", pickle_bin, {INVALID}, ["pickle", "adapter_model.bin"], ()),
    ("unknown-module-tensor", unknown_module_tensor, {PRECONDITION, INVALID}, ["foo_proj"], ()),
    ("unknown-target", unknown_target, {PRECONDITION, INVALID}, ["foo_proj"], ()),
    ("layer-out-of-range", layer_out_of_range, {PRECONDITION}, ["layers_to_transform", "[7]"], ()),
    ("dora", dora, {INVALID}, ["DoRA"], ()),
    ("bias", bias_training, {INVALID}, ["bias"], ()),
    ("not-lora", not_lora, {INVALID}, ["peft_type", "IA3"], ()),
    ("truncated-data", truncated_data, {INVALID}, [WEIGHTS, "not valid safetensors"], ()),
    ("truncated-header", truncated_header, {INVALID}, [WEIGHTS, "truncated"], ()),
    ("bad-config-json", garbage_config, {INVALID}, ["adapter_config.json", "JSON"], ()),
    ("missing-weights", missing_weights, {INVALID}, ["lacks", WEIGHTS], ()),
    ("unexpected-file", unexpected_file, {INVALID}, ["run.sh"], ()),
    ("oversized", oversized, {EXHAUSTED}, ["limit", str(MAX_UPLOAD)], ()),
    ("model-directory", model_weights, {INVALID}, ["model's files (config.json)", "not a PEFT adapter"], ()),
    ("labels-on-causal-lm", unchanged, {INVALID}, ["labels", "SEQ_CLS"], ("a", "b")),
]


def _chunks(name, files, labels=(), chunk=4096):
    yield adapters_pb2.UploadChunk(name=name, labels=list(labels))
    for fname, data in files.items():
        for off in range(0, max(len(data), 1), chunk):
            yield adapters_pb2.UploadChunk(filename=fname, data=data[off : off + chunk])


def _blob_files(run) -> set[Path]:
    root = Path(run.server.config.data_dir) / "blobs"
    return {p for p in root.rglob("*") if p.is_file()}


def _snapshot(run):
    listed = run.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(all_versions=True), timeout=10)
    return [(a.name, a.version, a.sha256) for a in listed.adapters], _blob_files(run)


def _refused(run, chunks) -> grpc.RpcError:
    before = _snapshot(run)
    with pytest.raises(grpc.RpcError) as e:
        run.adapters.UploadAdapter(chunks, timeout=30)
    assert _snapshot(run) == before, "a refused upload changed the registry"
    return e.value


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_is_refused_with_a_clear_message_and_nothing_stored(server, good, case):
    _, breaker, codes, words, labels = case
    err = _refused(server, _chunks("bad-one", breaker(good), labels))
    assert err.code() in codes, (err.code(), err.details())
    for w in words:
        assert w in err.details(), f"{w!r} not in {err.details()!r}"
    with pytest.raises(grpc.RpcError) as e:
        server.adapters.GetAdapter(common_pb2.AdapterRef(name="bad-one"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_rank_above_the_server_maximum_is_resource_exhausted(server, big_rank):
    err = _refused(server, _chunks("too-big-rank", big_rank))
    assert err.code() == EXHAUSTED
    assert "r=32" in err.details() and "16" in err.details()


@pytest.mark.parametrize("name", ["../x", "A", "a/b", "", "-x", "x" * 65, "a..b", "a b"])
def test_bad_names_are_invalid_argument(server, good, name):
    err = _refused(server, _chunks(name, good))
    assert err.code() == INVALID
    assert "name" in err.details()
    if name:
        assert repr(name) in err.details() or "first UploadChunk" in err.details()


def test_first_chunk_without_a_name_is_invalid_argument(server, good):
    def chunks():
        for fname, data in good.items():
            yield adapters_pb2.UploadChunk(filename=fname, data=data)

    err = _refused(server, chunks())
    assert err.code() == INVALID
    assert "first UploadChunk" in err.details() and "name" in err.details()


def test_the_good_adapter_is_accepted_after_all_the_refusals(server, good):
    """The table above can fail only if a good adapter passes: prove it does, and is stored."""
    before_blobs = _blob_files(server)
    a = server.adapters.UploadAdapter(_chunks("good-one", good), timeout=30)
    assert (a.name, a.version, a.rank) == ("good-one", 1, 4)
    assert len(_blob_files(server) - before_blobs) == 2  # config + weights
