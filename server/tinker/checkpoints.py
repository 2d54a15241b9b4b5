"""Training runs and their checkpoints on disk, per tenant: what survives a restart.

    <data-dir>/tinker/<tenant digest>/<run>/run.json                     the run (base, rank, targets, ...)
    <data-dir>/tinker/<tenant digest>/<run>/weights/<name>/              save_weights: PEFT files, the
        adapter_config.json, adapter_model.safetensors, optimizer.safetensors, checkpoint.json
    <data-dir>/tinker/<tenant digest>/<run>/sampler_weights/<name>/checkpoint.json
                                                                         save_weights_for_sampler: the
                                                                         registry version (name@N) it became

A checkpoint is written in a temporary folder and renamed into place, so a crash leaves a whole checkpoint
or none. Paths are the SDK's `tinker://<run>/weights/<name>` and `tinker://<run>/sampler_weights/<name>`;
a path names a run of the caller's tenant only (another tenant's is not found)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hotlora.adapters.errors import AlreadyExists, InvalidArgument, NotFound

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,127}")
KINDS = {"weights": "training", "sampler_weights": "sampler"}


@dataclass(frozen=True)
class TinkerPath:
    run: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.run}/{self.kind}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> TinkerPath:
        parts = text[len("tinker://") :].split("/") if text.startswith("tinker://") else []
        if (
            len(parts) != 3
            or parts[1] not in KINDS
            or not RUN.fullmatch(parts[0])
            or not NAME.fullmatch(parts[2])
        ):
            raise InvalidArgument(
                f"{text!r} is not a checkpoint path: tinker://<run>/weights/<name> or "
                "tinker://<run>/sampler_weights/<name>"
            )
        return cls(*parts)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise InvalidArgument(
            f"checkpoint name {name!r}: 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class Checkpoint:
    path: str
    kind: str  # training | sampler
    created: float
    size_bytes: int
    user_metadata: dict
    expires_at: float | None = None
    adapter_ref: str = ""  # sampler: the registry version (name@N)


class CheckpointStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _tenant(self, tenant: str) -> Path:
        return self.root / hashlib.sha256(tenant.encode()).hexdigest()[:16]

    def _dir(self, tenant: str, p: TinkerPath) -> Path:
        return self._tenant(tenant) / p.run / p.kind / p.name

    # ---- runs ------------------------------------------------------------------------------------
    def write_run(self, tenant: str, run: str, info: dict) -> None:
        folder = self._tenant(tenant) / run
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "run.json", json.dumps(info).encode())

    def run(self, tenant: str, run: str) -> dict | None:
        f = self._tenant(tenant) / run / "run.json"
        return json.loads(f.read_text()) if RUN.fullmatch(run) and f.exists() else None

    def runs(self, tenant: str) -> list[dict]:
        folder = self._tenant(tenant)
        if not folder.exists():
            return []
        out = [json.loads(f.read_text()) for f in folder.glob("*/run.json")]
        return sorted(out, key=lambda r: r.get("created", 0))

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(
        self, tenant: str, p: TinkerPath, files: dict[str, bytes], meta: Checkpoint, overwrite: bool
    ) -> None:
        dest = self._dir(tenant, p)
        if dest.exists() and not overwrite:
            raise AlreadyExists(f"{p} already exists (save with overwrite=True to replace it)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=dest.parent))
        try:
            for name, data in {**files, "checkpoint.json": json.dumps(asdict(meta)).encode()}.items():
                (tmp / name).write_bytes(data)
                _fsync(tmp / name)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def files(self, tenant: str, p: TinkerPath) -> dict[str, bytes]:
        self.meta(tenant, p)  # not found, or expired (then deleted)
        folder = self._dir(tenant, p)
        return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}

    def meta(self, tenant: str, p: TinkerPath) -> Checkpoint:
        ckpt = self._read(self._dir(tenant, p) / "checkpoint.json")
        if ckpt is None:
            raise NotFound(f"checkpoint {p} not found")
        return ckpt

    def list(self, tenant: str, run: str) -> list[Checkpoint]:
        out = []
        for kind in KINDS:
            for f in (self._tenant(tenant) / run / kind).glob("*/checkpoint.json"):
                ckpt = self._read(f)
                if ckpt is not None:
                    out.append(ckpt)
        return sorted(out, key=lambda c: c.created)

    @staticmethod
    def _read(f: Path) -> Checkpoint | None:
        """The checkpoint in `f`'s folder; None if there is none or its ttl_seconds have passed (it is
        deleted then: a checkpoint's files go once it is asked for after its expiry)."""
        if not f.exists():
            return None
        ckpt = Checkpoint(**json.loads(f.read_text()))
        if ckpt.expires_at is not None and ckpt.expires_at <= time.time():
            shutil.rmtree(f.parent, ignore_errors=True)
            return None
        return ckpt

    def delete(self, tenant: str, p: TinkerPath) -> None:
        folder = self._dir(tenant, p)
        if not folder.is_dir():
            raise NotFound(f"checkpoint {p} not found")
        shutil.rmtree(folder)


def tensors_bytes(tensors: dict) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def tensors_of(data: bytes) -> dict:
    return st_load(data)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
