"""The S3 blob store against a real S3 server (moto's, on loopback): committed offsets are what the
bucket holds, a resume on another front end verifies the bytes, an outage is UNAVAILABLE and leaves
nothing partial, failures and the janitor leave nothing behind, the worker cache is bounded."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from moments.core import errors
from moments.core.blob_backends import open_blob_store
from moments.core.config import Settings
from moments.service.auth import DEFAULT_TENANT
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc
from tests.media import make_large_video, make_noise_bytes
from tests.netproxy import TcpProxy
from tests.stack import staged_uploads, stored_blob_ids

MiB = 1024 * 1024
PART = 5 * MiB
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def big_video(tmp_path_factory) -> bytes:
    """A real video of a little over three parts."""
    return make_large_video(tmp_path_factory.mktemp("s3") / "big.mp4", 3 * PART + MiB).read_bytes()


def header(data: bytes, **fields) -> pb.UploadVideoRequest:
    return pb.UploadVideoRequest(header=pb.UploadHeader(
        size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), filename="v.mp4", **fields))


def chunks(data: bytes, start: int = 0, end: int | None = None, step: int = MiB):
    end = len(data) if end is None else end
    return [pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=o, data=data[o:min(o + step, end)]))
            for o in range(start, end, step)]


def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    for detail in rpc_status.from_call(exc).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {exc}")


def upload_prefix(stub, data: bytes, prefix_bytes: int) -> tuple[int, str]:
    """Send the first ``prefix_bytes`` and end the stream: (committed bytes, upload id)."""
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadVideo(iter([header(data), *chunks(data, end=prefix_bytes)]), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    info = error_info(err.value)
    return int(info.metadata["committed_bytes"]), info.metadata["upload_id"]


def bucket_parts(server, bucket: str) -> list[int]:
    """Part sizes of every multipart upload in progress in ``bucket``."""
    client = server.client()
    sizes = []
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", ()):
        parts = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        sizes += [p["Size"] for p in parts.get("Parts", ())]
    return sizes


def objects(server, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in server.client().list_objects_v2(Bucket=bucket).get("Contents", ()))


@pytest.fixture
def s3_front(redis_url, stack_factory, s3_server):
    bucket = s3_server.new_bucket()
    with stack_factory(workers=0, **s3_server.settings(bucket)) as s, grpc.insecure_channel(s.target) as channel:
        yield s, pb_grpc.MomentsStub(channel), bucket


# ------------------------------------------------------------------------- committed offsets


def test_committed_offset_is_the_whole_parts_the_bucket_holds(s3_front, s3_server, big_video):
    s, stub, bucket = s3_front
    committed, upload_id = upload_prefix(stub, big_video, 2 * PART + 3 * MiB)
    assert committed == 2 * PART, "buffered bytes past the last whole part count as committed"
    assert bucket_parts(s3_server, bucket) == [PART, PART]
    assert stub.GetUpload(pb.GetUploadRequest(upload_id=upload_id)).committed_bytes == 2 * PART
    assert stored_blob_ids(s) == [] and objects(s3_server, bucket) == [], "an object appeared before the end"
    # A chunk anywhere but the committed offset is refused with it.
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadVideo(iter([header(big_video), *chunks(big_video, 2 * PART + 3 * MiB, 2 * PART + 4 * MiB)]))
    assert int(error_info(err.value).metadata["committed_bytes"]) == 2 * PART
    done = stub.UploadVideo(iter([header(big_video), *chunks(big_video, 2 * PART)]), timeout=60)
    sha = hashlib.sha256(big_video).hexdigest()
    assert done.video.video_id == sha and not done.deduplicated
    assert stored_blob_ids(s) == [sha] and staged_uploads(s) == {}
    assert bucket_parts(s3_server, bucket) == []
    body = s3_server.client().get_object(Bucket=bucket, Key=f"moments/blobs/sha256/{sha[:2]}/{sha}")["Body"].read()
    assert body == big_video


@pytest.mark.slow
def test_a_resume_on_another_front_end_verifies_what_the_bucket_holds(redis_url, stack_factory, s3_server,
                                                                      big_video):
    """The second front end has no hash state of the first's parts: it hashes them from the bucket."""
    bucket = s3_server.new_bucket()
    settings = s3_server.settings(bucket)
    sha = hashlib.sha256(big_video).hexdigest()
    with stack_factory(workers=0, **settings) as first, grpc.insecure_channel(first.target) as channel:
        committed, upload_id = upload_prefix(pb_grpc.MomentsStub(channel), big_video, 2 * PART + MiB)
    assert committed == 2 * PART
    with stack_factory(workers=0, **settings) as second, grpc.insecure_channel(second.target) as channel:
        stub = pb_grpc.MomentsStub(channel)
        assert stub.GetUpload(pb.GetUploadRequest(upload_id=upload_id)).committed_bytes == 2 * PART
        # Other bytes after the committed prefix, under the original's sha256: caught, nothing kept.
        forged = big_video[:2 * PART] + bytes(len(big_video) - 2 * PART)
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadVideo(iter([header(big_video), *chunks(forged, 2 * PART)]), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in err.value.details()
        assert objects(s3_server, bucket) == [] and bucket_parts(s3_server, bucket) == []
        # Start over; cut again; the rest from the same front end (its own hash state) and done.
        assert upload_prefix(stub, big_video, PART + MiB)[0] == PART
        done = stub.UploadVideo(iter([header(big_video), *chunks(big_video, PART)]), timeout=60)
        assert done.video.video_id == sha
    assert objects(s3_server, bucket) == [f"moments/blobs/sha256/{sha[:2]}/{sha}"]


# ------------------------------------------------------------------------------------ outages


@pytest.mark.slow
def test_object_store_down_is_unavailable_then_the_upload_resumes(redis_url, stack_factory, s3_server,
                                                                  big_video):
    bucket = s3_server.new_bucket()
    sha = hashlib.sha256(big_video).hexdigest()
    with TcpProxy(s3_server.port) as proxy, \
            stack_factory(workers=0, **s3_server.settings(bucket, endpoint_url=proxy.url)) as s, \
            grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.MomentsStub(channel)

        def cut_after_the_first_part():
            yield header(big_video)
            yield from chunks(big_video, end=PART + MiB)
            deadline = time.monotonic() + 20
            while bucket_parts(s3_server, bucket) != [PART]:
                assert time.monotonic() < deadline, "the first part never landed"
                time.sleep(0.02)
            proxy.cut()
            yield from chunks(big_video, PART + MiB, 3 * PART)  # the second part cannot be stored

        with pytest.raises(grpc.RpcError) as err:
            stub.UploadVideo(cut_after_the_first_part(), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "object store" in err.value.details()
        for call in (lambda: stub.GetUpload(pb.GetUploadRequest(upload_id=_upload_id(sha, len(big_video)))),
                     lambda: stub.UploadVideo(iter([header(big_video), *chunks(big_video, end=MiB)]))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert objects(s3_server, bucket) == [], "a partial object was left"
        assert bucket_parts(s3_server, bucket) == [PART]

        proxy.restore()
        committed, _ = upload_prefix(stub, big_video, 0)
        assert committed == PART
        done = stub.UploadVideo(iter([header(big_video), *chunks(big_video, PART)]), timeout=60)
        assert done.video.video_id == sha
        assert stored_blob_ids(s) == [sha] and staged_uploads(s) == {}


def _upload_id(sha: str, size: int) -> str:
    """The id the front end derives for (tenant, bytes); without auth the tenant is the default one."""
    return hashlib.sha256(f"{DEFAULT_TENANT}\0{sha}\0{size}".encode()).hexdigest()[:32]


# ------------------------------------------------------------------ failures leave nothing


def test_failed_uploads_leave_nothing_in_the_bucket(s3_front, s3_server, big_video, tmp_path):
    s, stub, bucket = s3_front
    wrong = pb.UploadVideoRequest(header=pb.UploadHeader(size_bytes=len(big_video), sha256="0" * 64))
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadVideo(iter([wrong, *chunks(big_video)]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    noise = make_noise_bytes(tmp_path / "noise.mp4", 2 * PART + 123, prefix=b"\0\0\0\x18ftypisom").read_bytes()
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadVideo(iter([header(noise), *chunks(noise)]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()
    assert objects(s3_server, bucket) == [] and bucket_parts(s3_server, bucket) == []


def test_janitor_aborts_an_abandoned_multipart_upload(redis_url, stack_factory, s3_server, big_video):
    bucket = s3_server.new_bucket()
    with stack_factory(workers=0, upload_ttl_s=1, **s3_server.settings(bucket)) as s, \
            grpc.insecure_channel(s.target) as channel:
        committed, upload_id = upload_prefix(pb_grpc.MomentsStub(channel), big_video, PART + MiB)
        assert committed == PART and bucket_parts(s3_server, bucket) == [PART]
        deadline = time.monotonic() + 20
        while not s.run(s.stack.front.uploads.expire_abandoned()):
            assert time.monotonic() < deadline, "the upload never expired"
            time.sleep(0.1)
        assert bucket_parts(s3_server, bucket) == [] and objects(s3_server, bucket) == []


# ---------------------------------------------------------------------------- worker cache


def put_blob(server, bucket: str, data: bytes, key_sha: str | None = None) -> str:
    sha = key_sha or hashlib.sha256(data).hexdigest()
    server.client().put_object(Bucket=bucket, Key=f"moments/blobs/sha256/{sha[:2]}/{sha}", Body=data)
    return sha


def cached(settings: Settings) -> set[str]:
    return {p.name for p in settings.blob_cache_dir.iterdir()} if settings.blob_cache_dir.exists() else set()


def test_worker_cache_evicts_the_least_recently_used_and_never_a_blob_in_use(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    settings = Settings.from_env(environ={}, data_dir=str(tmp_path), blob_cache_bytes=int(2.5 * MiB),
                                 **s3_server.settings(bucket))
    store = open_blob_store(settings)
    a, b, c, d = (put_blob(s3_server, bucket, os.urandom(MiB)) for _ in range(4))
    for video_id in (a, b, a):  # a is used last
        with store.reader(video_id) as path:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == video_id
            time.sleep(0.01)  # distinct use times
    assert cached(settings) == {a, b} and (store.cache.hits, store.cache.misses) == (1, 2)
    with store.reader(c):
        pass
    assert cached(settings) == {a, c}, "b was the least recently used"
    with store.reader(a), store.reader(c):
        with store.reader(d) as path:  # nothing evictable: the cache goes over its bound meanwhile
            assert cached(settings) == {a, c, d} and path.exists()
    with store.reader(b):
        pass
    assert b in cached(settings) and store.cache.cached_bytes() <= settings.blob_cache_bytes


def test_worker_cache_refuses_a_blob_whose_bytes_do_not_match_its_id(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    settings = Settings.from_env(environ={}, data_dir=str(tmp_path), **s3_server.settings(bucket))
    store = open_blob_store(settings)
    forged = put_blob(s3_server, bucket, b"other bytes", key_sha="ab" * 32)
    with pytest.raises(errors.Internal, match="read back as"):
        with store.reader(forged):
            pass
    assert cached(settings) == set()
    with pytest.raises(FileNotFoundError):
        with store.reader("cd" * 32):
            pass


def test_s3_settings_are_checked(s3_server, tmp_path):
    base = dict(data_dir=str(tmp_path), **s3_server.settings("some-bucket"))
    with pytest.raises(ValueError, match="at least"):
        open_blob_store(Settings.from_env(environ={}, **{**base, "s3_part_bytes": MiB}))
    with pytest.raises(ValueError, match="s3_bucket"):
        open_blob_store(Settings.from_env(environ={}, **{**base, "s3_bucket": ""}))
    with pytest.raises(ValueError, match="not one of"):
        open_blob_store(Settings.from_env(environ={}, **{**base, "blob_backend": "gcs"}))


def test_front_end_on_s3_writes_nothing_under_its_data_dir(s3_front, big_video):
    s, stub, _ = s3_front
    stub.UploadVideo(iter([header(big_video), *chunks(big_video)]), timeout=60)
    written = [p for p in Path(s.settings.data_dir).rglob("*") if p.is_file()]
    assert written == [], "the front end staged bytes on its own disk"
