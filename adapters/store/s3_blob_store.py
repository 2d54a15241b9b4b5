"""Adapter blobs in an S3-compatible object store (AWS S3, MinIO, Ceph; docs/design.md §7).

`s3://bucket/prefix` holds `prefix/blobs/ab/cdef...`, content-addressed like the local store. An object
appears only once its upload completes (a multipart upload only at CompleteMultipartUpload), so a crash
mid-write leaves no blob, only an incomplete multipart upload that `abort_stale_uploads` clears.
Endpoint, region and credentials come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION,
AWS_ACCESS_KEY_ID, ...) unless given."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

from hotlora.adapters.caller import current_caller
from hotlora.adapters.errors import Unavailable
from hotlora.adapters.store.blob_store import BlobIntegrityError, BlobStore, sha256_hex
from hotlora.adapters.store.breaker import Breaker

log = logging.getLogger("hotlora.registry")

_SHA256 = re.compile(r"[0-9a-f]{64}")
STALE_UPLOAD_S = 3600.0  # an incomplete multipart upload older than this belongs to a crashed writer
CALLER_POLL_S = 0.05  # how often a waiting caller is asked whether it still waits
T = TypeVar("T")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """Without leading or trailing slashes; may be empty."""

    @staticmethod
    def parse(url: str) -> S3Location:
        parts = urlparse(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"--blob-store {url!r} is not s3://bucket[/prefix]")
        return S3Location(parts.netloc, parts.path.strip("/"))

    def key(self, rest: str) -> str:
        return f"{self.prefix}/{rest}" if self.prefix else rest

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str = ""
    """Empty = AWS_ENDPOINT_URL or AWS itself."""
    region: str = ""
    """Empty = AWS_REGION / AWS_DEFAULT_REGION."""
    multipart_bytes: int = 64 << 20
    """Blobs at least this large go up in parts of this size."""
    timeout_s: float = 5.0
    """A store that does not answer fails a call in about this long: connecting and each wait for bytes
    take at most half of it, and a failed request is tried once more. A call that keeps moving bytes (a
    large upload) is not cut."""


class S3BlobStore(BlobStore):
    def __init__(self, url: str, options: S3Options = S3Options(), client=None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if options.multipart_bytes < 5 << 20:
            raise ValueError("S3 multipart parts must be at least 5 MiB (--s3-multipart-bytes)")
        self.location = S3Location.parse(url)
        self.client = client or boto3.client(
            "s3",
            endpoint_url=options.endpoint_url or None,
            region_name=options.region or None,
            config=Config(
                retries={"total_max_attempts": 2, "mode": "standard"},
                connect_timeout=options.timeout_s / 2,
                read_timeout=options.timeout_s / 2,
            ),
        )
        self._breaker = Breaker(f"the adapter blob store {self.location}", probe=self._probe)
        # calls made for a waiting caller run here, so the caller stops waiting at its deadline or cancel
        self._calls = ThreadPoolExecutor(max_workers=16, thread_name_prefix="hotlora-s3")
        self._transfer = TransferConfig(
            multipart_threshold=options.multipart_bytes,
            multipart_chunksize=options.multipart_bytes,
            use_threads=False,
        )
        with self._errors("reach"):
            self.client.head_bucket(Bucket=self.location.bucket)

    def _key(self, sha256: str) -> str:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.location.key(f"blobs/{sha256[:2]}/{sha256[2:]}")

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        if self._size(digest) == len(data):
            return digest
        key = self._key(digest)
        self._run(
            "write to",
            lambda: self.client.upload_fileobj(
                io.BytesIO(data), self.location.bucket, key, Config=self._transfer
            ),
        )
        return digest

    def get(self, sha256: str) -> bytes:
        data = self._read(sha256)
        if sha256_hex(data) != sha256:
            raise BlobIntegrityError(
                f"blob {sha256} in {self.location} is damaged: its bytes hash differently"
            )
        return data

    def iter_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        # Two reads: the first verifies, the second streams; the blob never sits whole in memory.
        digest = hashlib.sha256()
        body = self._body(sha256)
        with self._errors("read"):
            for data in body.iter_chunks(chunk_bytes):
                digest.update(data)
        if digest.hexdigest() != sha256:
            raise BlobIntegrityError(
                f"blob {sha256} in {self.location} is damaged: its bytes hash differently"
            )
        first = True
        chunks = self._body(sha256).iter_chunks(chunk_bytes)
        while True:
            with self._errors("read"):
                data = next(chunks, None)
            if data is None:
                break
            first = False
            yield data
        if first:
            yield b""

    def exists(self, sha256: str) -> bool:
        return self._size(sha256) is not None

    def delete(self, sha256: str) -> None:
        key = self._key(sha256)
        self._run("delete from", lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def list(self) -> Iterator[str]:
        root = self.location.key("blobs/")
        with self._errors("list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=root
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    digest = obj["Key"][len(root) :].replace("/", "")
                    if _SHA256.fullmatch(digest):
                        yield digest

    def check(self) -> None:
        with self._errors("write to"):
            self.client.put_object(Bucket=self.location.bucket, Key=self.location.key(".health"), Body=b"ok")

    def close(self) -> None:
        self._breaker.close()
        self._calls.shutdown(wait=False, cancel_futures=True)

    def _probe(self) -> None:
        with _S3Errors(self.location, "reach", self._breaker, probe=True):
            self.client.head_bucket(Bucket=self.location.bucket)

    def abort_stale_uploads(self, older_than_s: float = STALE_UPLOAD_S) -> int:
        """Abort multipart uploads a crashed writer left (they are invisible but cost storage)."""
        aborted = 0
        with self._errors("list uploads in"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.location.bucket, Prefix=self.location.key("blobs/")
            )
            for page in pages:
                for up in page.get("Uploads", []):
                    if time.time() - up["Initiated"].timestamp() >= older_than_s:
                        self.client.abort_multipart_upload(
                            Bucket=self.location.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                        aborted += 1
        return aborted

    # ---- internals ----------------------------------------------------------------------------
    def _run(self, doing: str, call: Callable[[], T]) -> T:
        """`call` (one S3 request, errors as Unavailable); for a waiting caller on a worker thread, so that
        the caller's deadline or cancel ends the wait (the request itself ends within the client's own
        timeouts, its result unused)."""

        def bounded_call() -> T:
            with self._errors(doing):
                return call()

        caller = current_caller()
        if caller is None:
            return bounded_call()
        self._breaker.admit()  # before a thread is spent on it
        pending = self._calls.submit(bounded_call)
        while True:
            try:
                return pending.result(timeout=CALLER_POLL_S)
            except FutureTimeout:
                gone = caller.gone()
                if gone is not None:
                    raise type(gone)(f"{gone.message}; the blob store call was abandoned") from None

    def _size(self, sha256: str) -> int | None:
        from botocore.exceptions import ClientError

        key = self._key(sha256)
        try:
            head = self._run("read", lambda: self.client.head_object(Bucket=self.location.bucket, Key=key))
        except Unavailable as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 404:
                return None
            raise
        return int(head["ContentLength"])

    def _body(self, sha256: str):
        """The object's streaming body (its reads are bounded by the client's read timeout)."""
        key = self._key(sha256)

        def open_body():
            return self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"]

        return self._missing_is_damage(sha256, lambda: self._run("read", open_body))

    def _read(self, sha256: str) -> bytes:
        key = self._key(sha256)

        def read() -> bytes:
            return self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"].read()

        return self._missing_is_damage(sha256, lambda: self._run("read", read))

    def _missing_is_damage(self, sha256: str, call: Callable[[], T]) -> T:
        from botocore.exceptions import ClientError

        try:
            return call()
        except Unavailable as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 404:
                raise BlobIntegrityError(f"blob {sha256} is missing from {self.location}") from None
            raise

    def _errors(self, doing: str):
        return _S3Errors(self.location, doing, self._breaker)


class _S3Errors:
    """botocore failures (endpoint down, throttled, denied) -> Unavailable naming the store; the breaker
    learns of those that mean the store is unreachable (a 404 or a 403 does not)."""

    def __init__(self, location: S3Location, doing: str, breaker: Breaker, probe: bool = False):
        self.location, self.doing, self.breaker, self.probe = location, doing, breaker, probe

    def __enter__(self):
        if not self.probe:
            self.breaker.admit()
        return self

    def __exit__(self, exc_type, exc, tb):
        from botocore.exceptions import BotoCoreError, ClientError

        if exc is None:
            self.breaker.succeeded()
            return False
        if not isinstance(exc, BotoCoreError | ClientError):
            return False
        if isinstance(exc, BotoCoreError) or _status(exc) >= 500:
            self.breaker.failed(f"could not {self.doing} it: {exc}")
        else:
            self.breaker.succeeded()  # it answered
        if not (isinstance(exc, ClientError) and _status(exc) == 404) and not self.probe:
            log.warning("blob store %s: could not %s it: %s", self.location, self.doing, exc)
        raise Unavailable(
            f"the adapter blob store {self.location} is unavailable (could not {self.doing} it: {exc}); "
            "retry later"
        ) from exc


def _status(exc) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
