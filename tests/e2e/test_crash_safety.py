"""SIGKILL the server in the middle of a stream of uploads, restart it on the same data dir: no partial
version is visible, every acknowledged upload exports byte-identical and serves, and no blob is left
that no version references. Several trials, each killed at a random moment."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from hotlora.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc
from tests.server.adapter_utils import make_peft_adapter, upload_chunks

HOTLORA = str(Path(sys.executable).with_name("hotlora"))
TRIALS = 3  # each trial restarts the server (~10-15 s of imports on 2 cores)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Server:
    """`hotlora serve` as a user runs it, on a tiny model."""

    def __init__(self, model_dir: Path, data_dir: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
        self.proc = subprocess.Popen(
            [HOTLORA, "serve", "--model", str(model_dir), "--port", "0", "--metrics-port", "0",
             "--http-port", "-1", "--data-dir", str(data_dir), "--adapter-slots", "4", "--max-rank", "16"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(90), "server did not become ready:\n" + "".join(self.lines)
        port = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", "".join(self.lines)).group(1)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "hotlora: ready" in line:
                self.ready.set()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.channel.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return [
        make_peft_adapter(root / f"s{i}", seed=i + 1, r=16, lora_alpha=16, target_modules=ALL)
        for i in range(3)
    ]


def _upload_forever(server: Server, sources, acked: list, stop: threading.Event, trial: int):
    for n in range(10_000):
        if stop.is_set():
            return
        src = sources[n % len(sources)]
        name = f"t{trial}-a{n % 3}"  # three names, so versions pile up
        try:
            a = server.adapters.UploadAdapter(upload_chunks(name, src, chunk=1024), timeout=30)
        except grpc.RpcError:
            return  # the server died under us: this one was never acknowledged
        acked.append((a.name, a.version, src))


def _export(server: Server, ref: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for c in server.adapters.ExportAdapter(common_pb2.AdapterRef(name=ref), timeout=30):
        files[c.filename] = files.get(c.filename, b"") + c.data
    return files


def _check_consistent(server: Server, data_dir: Path, acked_all: list) -> None:
    listed = server.adapters.ListAdapters(
        adapters_pb2.ListAdaptersRequest(all_versions=True), timeout=30
    ).adapters
    versions = {(a.name, a.version): a for a in listed}
    # every acknowledged upload survived, byte for byte, and serves
    for name, version, src in acked_all:
        assert (name, version) in versions, f"acknowledged {name}@{version} lost in the crash"
        files = _export(server, f"{name}@{version}")
        for fname in ("adapter_config.json", "adapter_model.safetensors"):
            assert files[fname] == (src / fname).read_bytes(), f"{name}@{version}/{fname} differs"
    # no partial version: whatever is listed (acknowledged or committed just before the kill) is whole
    by_name: dict[str, list[int]] = {}
    referenced: set[str] = set()
    for (name, version), a in versions.items():
        by_name.setdefault(name, []).append(version)
        files = _export(server, f"{name}@{version}")
        assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
        assert hashlib.sha256(files["adapter_model.safetensors"]).hexdigest() == a.sha256
        assert a.size_bytes == sum(len(d) for d in files.values())
        referenced |= {hashlib.sha256(d).hexdigest() for d in files.values()}
    for name, vs in by_name.items():
        assert sorted(vs) == list(range(1, len(vs) + 1)), f"{name}: versions {sorted(vs)} have gaps"
    # no orphan and no temp file in the blob store
    blob_root = data_dir / "blobs"
    on_disk = {p.parent.name + p.name for p in blob_root.rglob("*") if p.is_file()}
    assert on_disk == referenced, f"orphans {on_disk - referenced}, missing {referenced - on_disk}"
    # a sample of the committed adapters serves
    for name, version in sorted(versions)[-3:]:
        resp = server.inference.Generate(inference_pb2.GenerateRequest(
            prompt="after the crash", adapter=f"{name}@{version}",
            params=common_pb2.SamplingParams(max_new_tokens=4)), timeout=60)  # fmt: skip
        assert len(resp.token_ids) > 0 and resp.adapter == f"{name}@{version}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_during_uploads_loses_nothing_acknowledged_and_leaves_nothing_partial(
    tiny_model_dir, tmp_path, sources
):
    data_dir = tmp_path / "data"
    rng = random.Random(1234)
    acked_all: list = []
    server = Server(tiny_model_dir, data_dir)
    try:
        for trial in range(TRIALS):
            acked: list = []
            stop = threading.Event()
            uploader = threading.Thread(target=_upload_forever, args=(server, sources, acked, stop, trial))
            uploader.start()
            time.sleep(rng.uniform(0.2, 1.5))  # a random moment in the upload stream
            server.kill()
            stop.set()
            uploader.join(30)
            acked_all += acked
            server = Server(tiny_model_dir, data_dir)
            _check_consistent(server, data_dir, acked_all)
        assert len(acked_all) >= TRIALS, "too few uploads were acknowledged for the test to mean anything"
    finally:
        if server.proc.poll() is None:
            server.kill()
