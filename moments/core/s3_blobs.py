"""The blob store in an S3-compatible bucket (boto3).

Layout under ``s3_prefix``: ``blobs/sha256/ab/<sha256>`` holds each video once;
``uploads/<upload_id>`` is the staging key of an unfinished upload.

An upload is a multipart upload to its staging key, one part (``s3_part_bytes``, >= 5 MiB) sent
whenever that much has arrived, with at most one part in flight while the next fills: the front
end holds at most two parts per upload, never the file. What the bucket lists as uploaded parts
(``ListParts``) is the committed offset a client resumes from; buffered bytes past it are dropped
when a stream ends and sent again. Once every byte is in, the multipart upload is completed at the
staging key, the probe reads that object through a presigned URL (range requests), and the commit
copies it to the blob's key inside the store (no byte passes through the front end) and deletes
the staging object. A failed or abandoned upload is aborted (its parts freed) and its staging
object deleted, so no partial object is left; a bucket lifecycle rule that aborts incomplete
multipart uploads after a day is the backstop for a front end that dies mid-upload.

Workers read a blob through :class:`moments.core.blob_cache.BlobCache`: a bounded local directory
with least-recently-used eviction, since decoders need a seekable local file.

Errors: an unreachable store, timeouts, 5xx and throttling answers, and a store that refuses our
credentials or bucket are :class:`~moments.core.errors.Unavailable` (the caller retries later;
nothing partial was committed). Credentials come from Settings (or boto3's default chain: AWS_*
environment, instance role), never from a client, and are never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from moments.core import errors
from moments.core.blob_cache import BlobCache
from moments.core.blobs import BlobStore, HashStates, Staging, check_upload_id, check_video_id

log = logging.getLogger(__name__)
LONG_CALL_S = 900.0
"""Read timeout of the calls whose answer comes when the store has assembled or copied a whole
object (CompleteMultipartUpload, CopyObject): far longer than one part's."""
MIN_PART_BYTES = 5 * 1024**2
"""S3's smallest part (every part but the last)."""
MAX_PARTS = 10_000
READ_BLOCK_BYTES = 8 * 1024**2
PRESIGN_MARGIN_S = 60
DOWNLOAD = TransferConfig(multipart_threshold=64 * 1024**2, multipart_chunksize=64 * 1024**2, max_concurrency=8)
"""Worker downloads: ranged GETs of 64 MiB, 8 at a time."""
COPY = TransferConfig(multipart_threshold=5 * 1024**3, multipart_chunksize=512 * 1024**2, max_concurrency=8)
"""Commits: one CopyObject up to 5 GiB (S3's limit for it), part copies of 512 MiB above."""

_UNAVAILABLE_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
    "AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
})


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Turn boto3 failures of the store itself into Unavailable (with the reason)."""
    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _UNAVAILABLE_CODES or status >= 500:
            raise errors.Unavailable(f"the object store could not {what}: {code or status}") from exc
        raise
    except BotoCoreError as exc:  # connection refused or reset, timeouts, DNS
        raise errors.Unavailable(f"the object store is unreachable ({what}): {exc}") from exc


_SESSION = boto3.session.Session()
_SESSION_LOCK = threading.Lock()
"""Clients come from one session (its loaded service model is shared: a session costs ~13 MB);
creating clients is not thread-safe, using them is."""
_CLIENTS: dict[tuple, object] = {}


def shared_client(settings):
    """One client per endpoint, region and credentials in this process (for ingest from s3://)."""
    key = (settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id, settings.s3_timeout_s)
    with _SESSION_LOCK:
        client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS.setdefault(key, s3_client(settings))
    return client


def s3_client(settings, *, read_timeout_s: float | None = None):
    """A boto3 S3 client for the settings' endpoint, region and credentials (thread-safe)."""
    credentials = {}
    if settings.s3_access_key_id:
        credentials = {"aws_access_key_id": settings.s3_access_key_id,
                       "aws_secret_access_key": settings.s3_secret_access_key}
    config = Config(
        connect_timeout=settings.s3_timeout_s, read_timeout=read_timeout_s or settings.s3_timeout_s,
        retries={"mode": "standard", "max_attempts": 3}, max_pool_connections=32,
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    with _SESSION_LOCK:
        return _SESSION.client("s3", endpoint_url=settings.s3_endpoint_url or None,
                               region_name=settings.s3_region or None, config=config, **credentials)


def check_s3_settings(settings) -> None:
    if not settings.s3_bucket:
        raise ValueError("blob_backend=s3 needs s3_bucket")
    if settings.s3_part_bytes < MIN_PART_BYTES:
        raise ValueError(f"s3_part_bytes must be at least {MIN_PART_BYTES} (S3's smallest part)")
    if settings.max_upload_bytes > settings.s3_part_bytes * MAX_PARTS:
        raise ValueError(f"max_upload_bytes {settings.max_upload_bytes} needs more than {MAX_PARTS} parts of "
                         f"s3_part_bytes {settings.s3_part_bytes}; raise s3_part_bytes")


@dataclass
class _Part:
    number: int
    etag: str
    size: int


class S3BlobStore(BlobStore):
    backend = "s3"

    def __init__(self, client, bucket: str, prefix: str, *, part_bytes: int, cache: BlobCache,
                 presign_s: int = 120, slow_client=None) -> None:
        self.client = client
        self.slow_client = slow_client or client
        self.bucket = bucket
        self.prefix = prefix
        self.part_bytes = part_bytes
        self.cache = cache
        self.presign_s = presign_s
        self.hash_states = HashStates()

    @classmethod
    def from_settings(cls, settings) -> "S3BlobStore":
        check_s3_settings(settings)
        client = s3_client(settings)
        store: S3BlobStore

        def fetch(video_id: str, dest: Path) -> None:
            store.download(video_id, dest)

        cache = BlobCache(settings.blob_cache_dir, settings.blob_cache_bytes, fetch, size_of=lambda v: store.size(v))
        store = cls(client, settings.s3_bucket, settings.s3_prefix, part_bytes=settings.s3_part_bytes,
                    cache=cache, presign_s=int(settings.probe_timeout_s) + PRESIGN_MARGIN_S,
                    slow_client=s3_client(settings, read_timeout_s=LONG_CALL_S))
        return store

    # ------------------------------------------------------------------------------ keys

    def blob_key(self, video_id: str) -> str:
        check_video_id(video_id)
        return f"{self.prefix}blobs/sha256/{video_id[:2]}/{video_id}"

    def staging_key(self, upload_id: str) -> str:
        return f"{self.prefix}uploads/{check_upload_id(upload_id)}"

    # ----------------------------------------------------------------------------- blobs

    def size(self, video_id: str) -> int | None:
        return self._size_of(self.blob_key(video_id))

    def exists(self, video_id: str) -> bool:
        return self.size(video_id) is not None

    def delete(self, video_id: str) -> None:
        with store_errors("delete a blob"):
            self.client.delete_object(Bucket=self.bucket, Key=self.blob_key(video_id))

    @contextlib.contextmanager
    def reader(self, video_id: str) -> Iterator[Path]:
        check_video_id(video_id)
        with self.cache.pinned(video_id) as path:
            yield path

    def download(self, video_id: str, dest: Path) -> None:
        """Copy the blob into ``dest`` (ranged GETs in parallel) and check its sha256."""
        with store_errors("read a blob"):
            try:
                self.client.download_file(self.bucket, self.blob_key(video_id), str(dest), Config=DOWNLOAD)
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey"):
                    raise FileNotFoundError(f"blob {video_id} is not in s3://{self.bucket}/{self.prefix}") from exc
                raise
        digest = hashlib.sha256()
        with open(dest, "rb") as f:
            while block := f.read(READ_BLOCK_BYTES):
                digest.update(block)
        if digest.hexdigest() != video_id:
            raise errors.Internal(f"blob {video_id} read back as {digest.hexdigest()}")

    # --------------------------------------------------------------------------- staging

    def open_staging(self, upload_id: str) -> "S3Staging":
        return S3Staging(self, upload_id)

    def staged_bytes(self, upload_id: str) -> int:
        key = self.staging_key(upload_id)
        done = self._size_of(key)
        if done is not None:
            return done
        mpu = self._find_upload(key)
        return sum(p.size for p in self._parts(key, mpu)) if mpu else 0

    def discard_staging(self, upload_id: str) -> None:
        key = self.staging_key(upload_id)
        self.hash_states.drop(upload_id)
        with store_errors("discard an upload"):
            for mpu in self._uploads_of(key):
                self._abort(key, mpu)
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def commit(self, staging: Staging, video_id: str) -> None:
        """Copy the completed staging object to the blob's key inside the store, then delete it."""
        assert isinstance(staging, S3Staging)
        target = self.blob_key(video_id)
        with store_errors("store a blob"):
            if self._size_of(target) is None:
                self.slow_client.copy({"Bucket": self.bucket, "Key": staging.key}, self.bucket, target, Config=COPY)
            self.client.delete_object(Bucket=self.bucket, Key=staging.key)

    # --------------------------------------------------------------------------- helpers

    def _size_of(self, key: str) -> int | None:
        with store_errors("look up an object"):
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def _uploads_of(self, key: str) -> list[str]:
        """Ids of the multipart uploads in progress for exactly ``key``."""
        found: list[str] = []
        with store_errors("list uploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=key)
            for page in pages:
                found += [u["UploadId"] for u in page.get("Uploads", ()) if u["Key"] == key]
        return found

    def _find_upload(self, key: str) -> str | None:
        """The multipart upload of ``key`` holding the most; any other (a crash's leftover) is aborted."""
        uploads = self._uploads_of(key)
        if len(uploads) <= 1:
            return uploads[0] if uploads else None
        best = max(uploads, key=lambda mpu: sum(p.size for p in self._parts(key, mpu)))
        for mpu in uploads:
            if mpu != best:
                self._abort(key, mpu)
        return best

    def _parts(self, key: str, mpu: str) -> list[_Part]:
        """The uploaded parts 1..n without a gap (what the store holds for sure), in order."""
        listed: dict[int, _Part] = {}
        with store_errors("list parts"):
            pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=mpu)
            for page in pages:
                for p in page.get("Parts", ()):
                    listed[int(p["PartNumber"])] = _Part(int(p["PartNumber"]), p["ETag"], int(p["Size"]))
        parts = []
        while len(parts) + 1 in listed:
            parts.append(listed[len(parts) + 1])
        return parts

    def _abort(self, key: str, mpu: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=mpu)
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                raise


class S3Staging(Staging):
    """One upload's multipart upload: parts of ``part_bytes``, one in flight while the next fills."""

    def __init__(self, store: S3BlobStore, upload_id: str) -> None:
        self.store = store
        self.upload_id = upload_id
        self.key = store.staging_key(upload_id)
        self._client = store.client
        self._parts: list[_Part] = []
        self._mpu: str | None = None
        self._completed = store._size_of(self.key) is not None  # finished before, not yet committed
        if self._completed:
            self._durable = store.staged_bytes(upload_id)
        else:
            self._mpu = store._find_upload(self.key)
            if self._mpu is None:
                with store_errors("start an upload"):
                    self._mpu = self._client.create_multipart_upload(Bucket=store.bucket, Key=self.key)["UploadId"]
            else:
                self._parts = store._parts(self.key, self._mpu)
            self._durable = sum(p.size for p in self._parts)
        # None: the hash of the held bytes is unknown here; finish() verifies by reading them back.
        self._hasher = store.hash_states.take(upload_id, self._durable) or (
            hashlib.sha256() if self._durable == 0 else None)
        self._held_state = self._hasher.copy() if self._hasher is not None else None  # at _durable
        self._buffer = bytearray()
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: tuple[Future, int, int, object] | None = None
        self._digest = ""

    @property
    def durable_bytes(self) -> int:
        return self._durable

    def append(self, data: bytes) -> None:
        if self._completed:
            raise errors.InvalidArgument("data beyond the declared size", field="chunk.data")
        view = memoryview(data)
        while view:
            take = min(len(view), self.store.part_bytes - len(self._buffer))
            piece = view[:take]
            self._buffer += piece
            if self._hasher is not None:
                self._hasher.update(piece)
            view = view[take:]
            if len(self._buffer) == self.store.part_bytes:
                body, self._buffer = self._buffer, bytearray()
                self._send(body)

    def settle(self) -> int:
        self._wait()
        return self._durable

    def finish(self) -> str:
        if not self._completed:
            if self._buffer:
                body, self._buffer = self._buffer, bytearray()
                self._send(body)
            self._wait()
            self._complete()
            self._completed = True
        if self._hasher is None:  # resumed in another process: hash what the store holds
            self._hasher = self._read_back()
        self._digest = self._hasher.hexdigest()
        return self._digest

    def _complete(self) -> None:
        parts = [{"PartNumber": p.number, "ETag": p.etag} for p in self._parts]
        with store_errors("complete an upload"):
            try:
                self.store.slow_client.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self._mpu, MultipartUpload={"Parts": parts})
            except ClientError as exc:
                # A retried call whose first attempt completed it (the answer was lost) finds no upload.
                if error_code(exc) != "NoSuchUpload" or self.store._size_of(self.key) != self._durable:
                    raise

    def probe_target(self) -> str:
        with store_errors("sign a read"):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.store.bucket, "Key": self.key}, ExpiresIn=self.store.presign_s)

    def close(self) -> None:
        try:
            self._wait()
        except errors.MomentsError as exc:
            log.warning("upload %s: the part in flight failed (%s)", self.upload_id, exc.message)
        finally:
            self._buffer = bytearray()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._held_state is not None and not self._digest:  # for a resume in this process
                self.store.hash_states.put(self.upload_id, self._durable, self._held_state)

    def discard(self) -> None:
        self._in_flight = None
        self._held_state = None
        self.close()
        self.store.discard_staging(self.upload_id)

    # ---------------------------------------------------------------------------- parts

    def _send(self, body: bytearray) -> None:
        """Upload ``body`` as the next part in the background, after the one in flight is done."""
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"part-{self.upload_id[:8]}")
        number = len(self._parts) + 1
        state = self._hasher.copy() if self._hasher is not None else None
        future = self._pool.submit(self._upload_part, number, body)
        self._in_flight = (future, number, len(body), state)

    def _upload_part(self, number: int, body: bytearray) -> str:
        with store_errors("store a part"):
            return self._client.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=self._mpu,
                                            PartNumber=number, Body=body)["ETag"]

    def _wait(self) -> None:
        if self._in_flight is None:
            return
        future, number, size, state = self._in_flight
        self._in_flight = None
        etag = future.result()  # raises the part's error (Unavailable)
        self._parts.append(_Part(number, etag, size))
        self._durable += size
        self._held_state = state

    def _read_back(self):
        hasher = hashlib.sha256()
        with store_errors("read an upload back"):
            body = self._client.get_object(Bucket=self.store.bucket, Key=self.key)["Body"]
            for block in body.iter_chunks(READ_BLOCK_BYTES):
                hasher.update(block)
        return hasher
