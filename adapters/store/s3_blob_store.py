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
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from hotlora.adapters.errors import Unavailable
from hotlora.adapters.store.blob_store import BlobIntegrityError, BlobStore, sha256_hex

log = logging.getLogger("hotlora.registry")

_SHA256 = re.compile(r"[0-9a-f]{64}")
STALE_UPLOAD_S = 3600.0  # an incomplete multipart upload older than this belongs to a crashed writer


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
                retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30
            ),
        )
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
        with self._errors("write to"):
            self.client.upload_fileobj(
                io.BytesIO(data), self.location.bucket, self._key(digest), Config=self._transfer
            )
        return digest

    def get(self, sha256: str) -> bytes:
        data = self._body(sha256).read()
        if sha256_hex(data) != sha256:
            raise BlobIntegrityError(
                f"blob {sha256} in {self.location} is damaged: its bytes hash differently"
            )
        return data

    def iter_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        # Two reads: the first verifies, the second streams; the blob never sits whole in memory.
        digest = hashlib.sha256()
        for data in self._body(sha256).iter_chunks(chunk_bytes):
            digest.update(data)
        if digest.hexdigest() != sha256:
            raise BlobIntegrityError(
                f"blob {sha256} in {self.location} is damaged: its bytes hash differently"
            )
        first = True
        for data in self._body(sha256).iter_chunks(chunk_bytes):
            first = False
            yield data
        if first:
            yield b""

    def exists(self, sha256: str) -> bool:
        return self._size(sha256) is not None

    def delete(self, sha256: str) -> None:
        with self._errors("delete from"):
            self.client.delete_object(Bucket=self.location.bucket, Key=self._key(sha256))

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
    def _size(self, sha256: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            with self._errors("read"):
                head = self.client.head_object(Bucket=self.location.bucket, Key=self._key(sha256))
        except Unavailable as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 404:
                return None
            raise
        return int(head["ContentLength"])

    def _body(self, sha256: str):
        from botocore.exceptions import ClientError

        try:
            with self._errors("read"):
                return self.client.get_object(Bucket=self.location.bucket, Key=self._key(sha256))["Body"]
        except Unavailable as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 404:
                raise BlobIntegrityError(f"blob {sha256} is missing from {self.location}") from None
            raise

    def _errors(self, doing: str):
        return _S3Errors(self.location, doing)


class _S3Errors:
    """botocore failures (endpoint down, throttled, denied) -> Unavailable naming the store."""

    def __init__(self, location: S3Location, doing: str):
        self.location, self.doing = location, doing

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from botocore.exceptions import BotoCoreError, ClientError

        if exc is None or not isinstance(exc, BotoCoreError | ClientError):
            return False
        if not (isinstance(exc, ClientError) and _status(exc) == 404):
            log.warning("blob store %s: could not %s it: %s", self.location, self.doing, exc)
        raise Unavailable(
            f"the adapter blob store {self.location} is unavailable (could not {self.doing} it: {exc}); "
            "retry later"
        ) from exc


def _status(exc) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
