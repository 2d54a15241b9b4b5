"""Hostile uploads (hypothesis, bounded): random and corrupt safetensors, lying header lengths, duplicate
tensor names, hostile adapter names, JSON bombs and huge numbers in adapter_config.json. Every upload ends
with a valid adapter or a non-INTERNAL refusal, nothing rejected ever shows in the registry, no blob is
left behind, and the server stays healthy.

HOTLORA_FUZZ_REPORT=FILE appends the outcome counts by status as JSON lines."""

from __future__ import annotations

import collections
import json
import os
import struct
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter
from tests.server.harness import running_server

EXAMPLES = int(os.environ.get("HOTLORA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
OUTCOMES: collections.Counter = collections.Counter()
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, bytes]:
    d = make_peft_adapter(
        tmp_path_factory.mktemp("peft") / "v", seed=3, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]
    )
    return {f: (d / f).read_bytes() for f in (CONFIG, WEIGHTS)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, valid):
    data = tmp_path_factory.mktemp("data")
    with running_server(
        tiny_model_dir, data, max_rank=8, max_upload_bytes=2 << 20, max_new_tokens=4, default_max_new_tokens=4
    ) as run:
        run.data_dir = Path(data)
        run.adapters.UploadAdapter(_chunks("keep", valid))
        run.snapshot = _registry(run)
        yield run
    report = os.environ.get("HOTLORA_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(
                json.dumps(
                    {
                        "file": "test_fuzz_upload",
                        "examples_per_test": EXAMPLES,
                        "outcomes": {f"{k[0]} {k[1]}": v for k, v in sorted(OUTCOMES.items())},
                    }
                )
                + "\n"
            )


def _chunks(name, files, labels=(), chunk=8192):
    yield adapters_pb2.UploadChunk(name=name, labels=list(labels))
    for fname, data in files.items():
        for off in range(0, max(len(data), 1), chunk):
            yield adapters_pb2.UploadChunk(filename=fname, data=data[off : off + chunk])


def _registry(run):
    resp = run.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(all_versions=True), timeout=10)
    return sorted((a.name, a.version, a.sha256) for a in resp.adapters)


def _blobs(run) -> int:
    return sum(1 for p in (run.data_dir / "blobs").rglob("*") if p.is_file())


def upload(run, what: str, name: str, files: dict[str, bytes], labels=()):
    """Upload; a refusal must leave registry and blob store exactly as they were."""
    before, blobs = _registry(run), _blobs(run)
    try:
        out = run.adapters.UploadAdapter(_chunks(name, files, labels), timeout=60)
    except grpc.RpcError as e:
        OUTCOMES[(what, e.code().name)] += 1
        assert e.code() in REFUSALS, f"{what}: {e.code().name}: {e.details()}"
        assert e.details() and "Stream removed" not in e.details(), e.details()
        assert _registry(run) == before and _blobs(run) == blobs
        return None
    OUTCOMES[(what, "OK")] += 1
    assert out.name == name
    # a valid adapter is served and exports byte-identical; then remove it to keep the registry fixed
    exported: dict[str, bytes] = {}
    for c in run.adapters.ExportAdapter(common_pb2.AdapterRef(name=f"{name}@{out.version}"), timeout=30):
        exported[c.filename] = exported.get(c.filename, b"") + c.data
    # README.md is accepted and ignored: never stored, never exported (issue 12, finding 4)
    assert exported == {k: v for k, v in files.items() if k != "README.md" and (v or k in exported)}
    run.inference.Generate(
        inference_pb2.GenerateRequest(prompt="hi", adapter=f"{name}@{out.version}"), timeout=30
    )
    run.adapters.DeleteAdapter(common_pb2.AdapterRef(name=name), timeout=10)
    assert _registry(run) == before and _blobs(run) == blobs
    return out


def _safetensors(header: bytes, body: bytes = b"", declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + body


def _mutate(data: bytes, pos: int, byte: int) -> bytes:
    pos %= max(len(data), 1)
    return data[:pos] + bytes([byte]) + data[pos + 1 :]


# ---- tests ---------------------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=4096), cfg_pick=st.booleans())
def test_random_bytes_as_safetensors(server, valid, data, cfg_pick):
    cfg = valid[CONFIG] if cfg_pick else data[:512]
    assert upload(server, "random_bytes", "fz", {CONFIG: cfg, WEIGHTS: data}) is None


@FUZZ
@given(
    cut=st.integers(0, 10_000),
    pos=st.integers(0, 10_000),
    byte=st.integers(0, 255),
    declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_truncated_and_corrupt_safetensors(server, valid, cut, pos, byte, declared):
    w = valid[WEIGHTS]
    variants = {"truncated": w[: cut % len(w)], "flipped_byte": _mutate(w, pos, byte)}
    if declared is not None:  # header length beyond (or inside) the file
        variants["header_length"] = struct.pack("<Q", declared) + w[8:]
    for what, data in variants.items():
        upload(server, what, "fz", {CONFIG: valid[CONFIG], WEIGHTS: data})


@FUZZ
@given(
    shape=st.lists(st.integers(-3, 2**40), max_size=4),
    dtype=st.sampled_from(["F32", "F16", "I64", "U8", "", "F8_E4M3"]),
    offsets=st.lists(st.integers(-5, 2**62), min_size=2, max_size=3),
    dup=st.booleans(),
)
def test_lying_and_duplicate_headers(server, valid, shape, dtype, offsets, dup):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    entry = json.dumps({"dtype": dtype, "shape": shape, "data_offsets": offsets})
    # duplicate keys are legal JSON text; safetensors must refuse (or decode) them, never crash
    header = ("{" + ",".join([f'"{key}":{entry}'] * (2 if dup else 1)) + "}").encode()
    upload(server, "lying_header", "fz", {CONFIG: valid[CONFIG], WEIGHTS: _safetensors(header, b"\0" * 64)})


@FUZZ
@given(
    name=st.one_of(
        st.text(max_size=80),
        st.sampled_from(
            [
                "..",
                "a..b",
                "../x",
                "a/b",
                "/abs",
                "a\x00b",
                "\x00",
                "",
                "A",
                "-a",
                ".a",
                "a" * 64,
                "a" * 65,
                "a" * 200_000,
                "é",
                "a b",
                "CON",
                "a\\b",
                "keep@2",
                "x@1",
            ]
        ),
    )
)
def test_hostile_adapter_names(server, valid, name):
    out = upload(server, "name", name, valid)
    if out is not None:
        assert name[0].isalnum() and ".." not in name and len(name) <= 64


def _nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@FUZZ
@given(
    field=st.sampled_from(
        [
            "r",
            "lora_alpha",
            "target_modules",
            "rank_pattern",
            "layers_to_transform",
            "alpha_pattern",
            "modules_to_save",
            "task_type",
            "peft_type",
            "use_rslora",
            "extra_field",
        ]
    ),
    value=st.one_of(
        st.sampled_from(
            [
                "1e999",
                "-1e999",
                "NaN",
                "Infinity",
                "1" + "0" * 4000,
                "1" + "0" * 5000,
                "-1",
                "0",
                "3.5",
                "true",
                "null",
                '""',
                '"q_proj"',
                '"(a+)+$"',
                '"' + "(a*)*" * 50 + 'b"',
                "[]",
                "{}",
                '["q_proj"]',
                '{"q_proj": 1e308}',
                "[1e308]",
                "1e308",
                "1e38",
                "-1e38",
                "[" + ",".join(["0"] * 5000) + "]",
            ]
        ),
        st.builds(_nested, st.integers(1, 1_500), st.sampled_from(["list", "dict"])),
        st.integers(-(2**80), 2**80).map(str),
        st.floats().map(json.dumps),
        st.text(max_size=40).map(json.dumps),
    ),
)
def test_hostile_adapter_config(server, valid, field, value):
    cfg = json.loads(valid[CONFIG])
    cfg.pop(field, None)
    body = json.dumps(cfg)
    text = body[:-1] + f', "{field}": {value}' + "}"  # raw splice: values json.dumps cannot write
    upload(server, "config", "fz", {CONFIG: text.encode(), WEIGHTS: valid[WEIGHTS]})


@FUZZ
@given(
    files=st.dictionaries(
        st.sampled_from(
            [CONFIG, WEIGHTS, "adapter_model.bin", "x.pt", "README.md", "../x", "", "a/b.json", "\x00"]
        ),
        st.binary(max_size=64),
        max_size=4,
    ),
    labels=st.lists(st.text(max_size=300), max_size=5),
)
def test_hostile_file_sets_and_labels(server, valid, files, labels):
    merged = {**valid, **{k: v for k, v in files.items() if k not in (CONFIG, WEIGHTS)}}
    upload(server, "file_set", "fz", merged, labels)
    upload(server, "file_set", "fz", files, labels)


def test_oversized_upload_is_refused_before_parsing(server, valid):
    big = valid[WEIGHTS] + b"\0" * (2 << 20)
    assert upload(server, "oversized", "fz", {CONFIG: valid[CONFIG], WEIGHTS: big}) is None


def test_server_is_healthy_after_the_fuzzing(server, valid):
    health = health_pb2_grpc.HealthStub(server.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert _registry(server) == server.snapshot
    resp = server.inference.Generate(
        inference_pb2.GenerateRequest(prompt="hello", adapter="keep"), timeout=30
    )
    assert resp.adapter == "keep@1" and resp.finish_reason in ("length", "eos")
    assert upload(server, "valid", "fresh", valid) is not None
