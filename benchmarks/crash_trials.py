"""Crash trials: `hotlora serve` in a subprocess takes uploads and deletes from two clients, is SIGKILLed at a
random moment, restarted on the same data dir, and checked:

- every acknowledged upload is listed (unless its delete was acknowledged) and exports byte-identical;
- anything else listed is an upload that was in flight at the kill, complete and byte-identical;
- no partial version, no orphan blob (files under data_dir/blobs == blobs the listed versions reference);
- the restarted server serves a Generate with a listed adapter.

Fine-tune promotion is not exercised yet (hotlora.v1.Training was not built when this was written).

    .venv/bin/python benchmarks/crash_trials.py --trials 30 [--seed 1]

tests/e2e/test_crash_trials.py runs a short version of the same harness.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
FILES = ("adapter_config.json", "adapter_model.safetensors")
READY_TIMEOUT = 120.0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Model:
    """What the clients know was committed: (name, version) -> files."""

    committed: dict[tuple[str, int], dict[str, bytes]] = field(default_factory=dict)
    # in flight at the kill: uploads (name, files) and deletes (ref) whose outcome is unknown
    pending_uploads: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    pending_deletes: list[str] = field(default_factory=list)
    # committed while a delete of every version of that name was in flight: the delete may or may not
    # have removed them (the server orders the two; the clients cannot see which came first)
    ambiguous: dict[tuple[str, int], dict[str, bytes]] = field(default_factory=dict)
    # how many deletes of every version of a name have started: an upload whose flight overlaps one is
    # ambiguous even when the delete is acknowledged first (the server may have committed the upload
    # before the delete ran, and answered it after)
    whole_deletes_started: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ServerProcess:
    def __init__(self, model_dir: Path, data_dir: Path, log_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
        hotlora = Path(sys.executable).with_name("hotlora")
        self.log = open(log_path, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(hotlora), "serve", "--model", str(model_dir), "--port", "0", "--metrics-port", "0",
             "--http-port", "-1", "--data-dir", str(data_dir), "--device", "cpu", "--workers", "8"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip
        self.port = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                if "gRPC on" in line:
                    self.port = int(line.split("gRPC on ")[1].split(",")[0].rsplit(":", 1)[1])
                if "hotlora: ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(READY_TIMEOUT):
            self.kill()
            raise RuntimeError(f"server not ready in {READY_TIMEOUT} s; see {log_path}")
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()


def _stubs(address):
    from hotlora.v1 import adapters_pb2_grpc, inference_pb2_grpc

    ch = grpc.insecure_channel(address)
    return ch, adapters_pb2_grpc.AdaptersStub(ch), inference_pb2_grpc.InferenceStub(ch)


def _upload_iter(name, files):
    from hotlora.v1 import adapters_pb2

    yield adapters_pb2.UploadChunk(name=name)
    for fname in FILES:
        data = files[fname]
        for off in range(0, len(data), 2048):  # many chunks: the kill can land mid-stream
            yield adapters_pb2.UploadChunk(filename=fname, data=data[off : off + 2048])


def _client(
    address,
    model: Model,
    names: list[str],
    variants: list[dict[str, bytes]],
    rng: random.Random,
    stop: threading.Event,
    counts: dict,
) -> None:
    from hotlora.v1 import common_pb2

    ch, adapters, _ = _stubs(address)
    try:
        while not stop.is_set():
            name = rng.choice(names)
            with model.lock:
                mine = sorted(v for (n, v) in model.committed if n == name)
            if mine and rng.random() < 0.35:
                ref = name if rng.random() < 0.3 else f"{name}@{rng.choice(mine)}"
                with model.lock:
                    model.pending_deletes.append(ref)
                    n, _, v = ref.partition("@")
                    if not v:
                        model.whole_deletes_started[n] = model.whole_deletes_started.get(n, 0) + 1
                    before = {k for k in model.committed if k[0] == n and (not v or k[1] == int(v))}
                try:
                    adapters.DeleteAdapter(common_pb2.AdapterRef(name=ref), timeout=10)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND and not stop.is_set():
                        raise
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        return  # killed mid-call: the delete stays pending
                with model.lock:
                    model.pending_deletes.remove(ref)
                    for key in [k for k in model.committed if k[0] == n and (not v or k[1] == int(v))]:
                        if key in before:
                            del model.committed[key]
                        else:  # uploaded while this delete was in flight
                            model.ambiguous[key] = model.committed.pop(key)
                counts["deletes"] += 1
            else:
                files = rng.choice(variants)
                entry = (name, files)
                with model.lock:
                    model.pending_uploads.append(entry)
                    deletes_before = model.whole_deletes_started.get(name, 0)
                    overlaps = name in model.pending_deletes  # a whole-name delete already in flight
                try:
                    out = adapters.UploadAdapter(_upload_iter(name, files), timeout=30)
                except grpc.RpcError:
                    if stop.is_set():
                        return  # killed mid-upload: outcome unknown, stays pending
                    raise
                with model.lock:
                    model.pending_uploads.remove(entry)
                    overlaps |= model.whole_deletes_started.get(name, 0) != deletes_before
                    (model.ambiguous if overlaps else model.committed)[(name, out.version)] = files
                counts["uploads"] += 1
    except grpc.RpcError:
        if not stop.is_set():
            raise
    finally:
        ch.close()


def check_after_restart(address, data_dir: Path, model: Model) -> dict:
    """Compare the restarted registry with the model; reconcile pending operations. Raises on a violation."""
    from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2

    ch, adapters, inference = _stubs(address)
    try:
        listed = adapters.ListAdapters(
            adapters_pb2.ListAdaptersRequest(all_versions=True), timeout=30
        ).adapters
        exported: dict[tuple[str, int], dict[str, bytes]] = {}
        for a in listed:
            files: dict[str, bytes] = {}
            for c in adapters.ExportAdapter(common_pb2.AdapterRef(name=f"{a.name}@{a.version}"), timeout=30):
                files[c.filename] = files.get(c.filename, b"") + c.data
            assert set(files) >= set(FILES), f"{a.name}@{a.version} is partial: {sorted(files)}"
            assert _sha(files["adapter_model.safetensors"]) == a.sha256, f"{a.name}@{a.version}: sha mismatch"
            exported[(a.name, a.version)] = files
        deleted_maybe = set()
        for ref in model.pending_deletes:
            n, _, v = ref.partition("@")
            deleted_maybe |= {k for k in model.committed if k[0] == n and (not v or k[1] == int(v))}
        for key, files in model.committed.items():
            if key in exported:
                assert exported[key] == files, f"{key} does not export byte-identical"
            else:
                assert key in deleted_maybe, f"acknowledged upload {key} is missing after the crash"
        recovered = 0
        for key, files in exported.items():
            if key in model.committed:
                continue
            if key in model.ambiguous:
                assert files == model.ambiguous[key], f"{key} does not export byte-identical"
                continue
            candidates = [f for n, f in model.pending_uploads if n == key[0]]
            assert any(files == f for f in candidates), f"{key} is listed but was never uploaded like this"
            recovered += 1
        # blobs on disk are exactly those the listed versions reference
        on_disk = {p.parent.name + p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}
        referenced = {_sha(d) for files in exported.values() for d in files.values()}
        assert on_disk == referenced, (
            f"orphan blobs {sorted(on_disk - referenced)[:3]}, missing {sorted(referenced - on_disk)[:3]}"
        )
        # the restarted server serves a listed adapter
        if exported:
            name, version = sorted(exported)[0]
            resp = inference.Generate(
                inference_pb2.GenerateRequest(prompt="after the crash", adapter=f"{name}@{version}"),
                timeout=60,
            )
            assert resp.adapter == f"{name}@{version}" and resp.finish_reason in ("length", "eos")
        # the restarted registry is the truth from now on
        model.committed = exported
        model.pending_uploads.clear()
        model.pending_deletes.clear()
        model.ambiguous.clear()
        return {"listed": len(exported), "recovered_in_flight": recovered, "blobs": len(on_disk)}
    finally:
        ch.close()


def make_variants(workdir: Path) -> list[dict[str, bytes]]:
    sys.path.insert(0, str(ROOT))
    from tests.server.adapter_utils import make_peft_adapter

    out = []
    for i, kw in enumerate(
        [
            dict(r=2, lora_alpha=4, target_modules=["q_proj"]),
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            dict(r=8, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
        ]
    ):
        d = make_peft_adapter(workdir / f"v{i}", seed=i + 1, **kw)
        out.append({f: (d / f).read_bytes() for f in FILES})
    return out


def run_trials(trials: int, seed: int, workdir: Path, max_kill_delay: float = 2.0, log=print) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.tiny import save_tiny_model_dir

    rng = random.Random(seed)
    model_dir = save_tiny_model_dir(workdir / "model")
    variants = make_variants(workdir / "peft")
    data_dir = workdir / "data"
    model = Model()
    survived, totals = 0, {"uploads": 0, "deletes": 0, "recovered_in_flight": 0}
    server = ServerProcess(model_dir, data_dir, workdir / "server.log")
    try:
        for t in range(trials):
            stop = threading.Event()
            counts = {"uploads": 0, "deletes": 0}
            errors: list[BaseException] = []

            def client(names, crng, address=server.address, stop=stop, counts=counts, errors=errors):
                try:
                    _client(address, model, names, variants, crng, stop, counts)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [
                threading.Thread(
                    target=client, args=([f"c{k}-a", f"c{k}-b", "shared"], random.Random(rng.random()))
                )
                for k in range(2)
            ]
            for th in threads:
                th.start()
            time.sleep(rng.uniform(0.05, max_kill_delay))
            stop.set()
            server.kill()  # SIGKILL while the clients are mid-operation
            for th in threads:
                th.join(30)
            if errors:
                raise errors[0]
            server = ServerProcess(model_dir, data_dir, workdir / "server.log")
            info = check_after_restart(server.address, data_dir, model)
            survived += 1
            totals["uploads"] += counts["uploads"]
            totals["deletes"] += counts["deletes"]
            totals["recovered_in_flight"] += info["recovered_in_flight"]
            log(
                f"trial {t + 1}/{trials}: ok ({counts['uploads']} uploads, {counts['deletes']} deletes "
                f"acknowledged; {info['listed']} versions listed, {info['recovered_in_flight']} in-flight "
                "upload(s) committed)"
            )
    finally:
        server.kill()
    return {"trials": trials, "survived": survived, **totals}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--max-kill-delay", type=float, default=2.0, help="seconds; the kill lands in [0.05, this]"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotlora-crash-") as d:
        t0 = time.monotonic()
        res = run_trials(args.trials, args.seed, Path(d), args.max_kill_delay)
    print(
        f"crash trials survived: {res['survived']}/{res['trials']} "
        f"({res['uploads']} uploads and {res['deletes']} deletes acknowledged, "
        f"{res['recovered_in_flight']} in-flight uploads found committed; {time.monotonic() - t0:.0f} s)"
    )
    return 0 if res["survived"] == res["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
