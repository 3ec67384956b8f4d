"""Tenants see nothing of each other (issue 20): per-owner video metadata, opaque page tokens,
validation at the front end, per-tenant upload caps and throttled failed authentication, on a real
front end with API keys (no worker: nothing here runs a job)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from moments.app.client import MomentsClient
from moments.v1 import moments_pb2_grpc as pb_grpc
from tests.stack import staged_uploads
from moments.service.auth import hash_key, peer_host
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb

KEYS = {"alice": "alice-secret", "bob": "bob-secret"}


def key_spec() -> str:
    return ",".join(f"{tenant}:{hash_key(key)}" for tenant, key in KEYS.items())


@pytest.fixture(scope="module")
def front(redis_server, stack_factory):
    redis_server.client().flushall()
    with stack_factory(workers=0, api_keys=key_spec()) as s:
        yield s


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_event_video(tmp_path_factory.mktemp("v") / "a.mp4", [Event("red", "square", 1, 2)],
                             seconds=4, fps=4)


@pytest.fixture
def clients(front, tmp_path, monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    with MomentsClient(front.target, api_key=KEYS["alice"]) as alice, \
            MomentsClient(front.target, api_key=KEYS["bob"]) as bob:
        yield alice, bob


def named(video, tmp_path, name: str):
    path = tmp_path / name
    shutil.copy(video, path)
    return path


def details(exc: grpc.RpcError, kind):
    for detail in rpc_status.from_call(exc).details:
        message = kind()
        if detail.Is(message.DESCRIPTOR):
            detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.__name__} in {rpc_status.from_call(exc)}")


def test_each_owner_sees_its_own_filename_of_shared_bytes(clients, video, tmp_path):
    alice, bob = clients
    first = alice.upload(named(video, tmp_path, "alice-secret-merger-plan.mp4"))
    second = bob.upload(named(video, tmp_path, "bob-holiday.mp4"))
    video_id = first.video.video_id
    assert second.video.video_id == video_id
    assert second.video.filename == "bob-holiday.mp4"
    assert bob.get_video(video_id).filename == "bob-holiday.mp4"
    assert [v.filename for v in bob.list_videos() if v.video_id == video_id] == ["bob-holiday.mp4"]
    assert alice.get_video(video_id).filename == "alice-secret-merger-plan.mp4"
    assert second.video.content_type == "video/*"
    assert second.video.create_time.ToNanoseconds() >= first.video.create_time.ToNanoseconds()
    # Alice deletes hers: Bob's record keeps his own name; her name is gone from the store.
    alice.delete_video(video_id)
    assert bob.get_video(video_id).filename == "bob-holiday.mp4"
    bob.delete_video(video_id)


BAD_LOCALIZE = [
    # (field of the BadRequest, how the request is spoiled)
    ("sampling.max_fps", lambda r: setattr(r.sampling, "max_fps", float("nan"))),
    ("sampling.max_fps", lambda r: setattr(r.sampling, "max_fps", float("inf"))),
    ("sampling.max_fps", lambda r: setattr(r.sampling, "max_fps", -1.0)),
    ("sampling.max_fps", lambda r: setattr(r.sampling, "max_fps", 2.5)),
    ("sampling.max_frames", lambda r: setattr(r.sampling, "max_frames", -2)),
    ("sampling.max_frames", lambda r: setattr(r.sampling, "max_frames", 4096)),  # the stack's cap is 64
    ("sampling.budget_tokens", lambda r: setattr(r.sampling, "budget_tokens", -1)),
    ("sampling.budget_tokens", lambda r: setattr(r.sampling, "budget_tokens", 1_000_000)),
    ("sampling.end_offset", lambda r: r.sampling.end_offset.FromSeconds(0)),
    ("sampling.end_offset", lambda r: r.sampling.end_offset.FromSeconds(-3)),
    ("sampling.start_offset", lambda r: r.sampling.start_offset.FromSeconds(-1)),
    ("sampling.start_offset", lambda r: r.sampling.start_offset.MergeFrom(pb.SamplingOptions().start_offset.__class__(
        seconds=1, nanos=-5))),
    ("max_new_tokens", lambda r: setattr(r, "max_new_tokens", 1024)),  # the stack's cap is 12
    ("max_new_tokens", lambda r: setattr(r, "max_new_tokens", -1)),
    ("min_confidence", lambda r: setattr(r, "min_confidence", float("nan"))),
    ("min_confidence", lambda r: setattr(r, "min_confidence", float("-inf"))),
    ("search.min_event", lambda r: r.search.min_event.FromSeconds(-1)),
    ("search.max_passes", lambda r: setattr(r.search, "max_passes", -1)),
    ("search.max_visual_tokens", lambda r: setattr(r.search, "max_visual_tokens", -(2**62))),
]


@pytest.mark.parametrize(("field", "spoil"), BAD_LOCALIZE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_LOCALIZE)])
def test_every_numeric_field_is_checked_at_the_front_end(front, clients, video, field, spoil):
    alice, _ = clients
    video_id = alice.upload(video).video.video_id
    request = pb.LocalizeRequest(video_id=video_id, queries=["a red square"])
    spoil(request)
    for call in (alice.stub.Localize, lambda r, **kw: list(alice.stub.StreamLocalize(r, **kw))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=alice.metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert details(err.value, error_details_pb2.BadRequest).field_violations[0].field == field


def test_index_and_ingest_numbers_are_checked(clients, video):
    alice, _ = clients
    video_id = alice.upload(video).video.video_id
    with pytest.raises(grpc.RpcError) as err:
        list(alice.stub.IndexVideo(pb.IndexVideoRequest(video_id=video_id, sampling=pb.SamplingOptions(
            max_fps=float("nan"))), metadata=alice.metadata, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        alice.stub.IngestVideo(pb.IngestVideoRequest(source_uri="https://example.com/a.mp4", size_bytes=-5),
                               metadata=alice.metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value, error_details_pb2.BadRequest).field_violations[0].field == "size_bytes"


def test_page_tokens_are_opaque_and_checked(clients, video, tmp_path):
    alice, bob = clients
    for i in range(3):
        alice.upload(write_event_video(tmp_path / f"v{i}.mp4", [Event("blue", "circle", 1, 2 + i)], seconds=4, fps=4))
    page = alice.stub.ListVideos(pb.ListVideosRequest(page_size=1), metadata=alice.metadata)
    assert page.next_page_token
    ids = [page.videos[0].video_id]
    token = page.next_page_token
    while token:
        page = alice.stub.ListVideos(pb.ListVideosRequest(page_size=1, page_token=token), metadata=alice.metadata)
        ids += [v.video_id for v in page.videos]
        token = page.next_page_token
    assert len(ids) == len(set(ids)) >= 3
    import base64
    forged = [base64.urlsafe_b64encode(b"99999999999999999999").decode(), "%%%", "A" * 5000,
              base64.urlsafe_b64encode(b"1").decode(), page.next_page_token + "x" if page.next_page_token else "x"]
    first = alice.stub.ListVideos(pb.ListVideosRequest(page_size=1), metadata=alice.metadata).next_page_token
    for token, who in [*((t, alice) for t in forged), (first, bob)]:  # Bob cannot use Alice's token
        with pytest.raises(grpc.RpcError) as err:
            who.stub.ListVideos(pb.ListVideosRequest(page_size=1, page_token=token), metadata=who.metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (token, err.value.details())
        assert details(err.value, error_details_pb2.BadRequest).field_violations[0].field == "page_token"


# ------------------------------------------------------------------ per-tenant caps on uploads

MiB = 1024 * 1024


def quota(exc: grpc.RpcError) -> tuple[str, float]:
    """The QuotaFailure subject and the RetryInfo delay of a RESOURCE_EXHAUSTED."""
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    return (details(exc, error_details_pb2.QuotaFailure).violations[0].subject,
            details(exc, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() / 1000)


async def _open_idle(stub, tenant: str, index: int, size_bytes: int, sent: asyncio.Queue, hold: asyncio.Event):
    """An upload stream that sends its header and one chunk, then idles until ``hold`` is set."""
    async def parts():
        digest = hashlib.sha256(f"{tenant} idle {index}".encode()).hexdigest()
        yield pb.UploadVideoRequest(header=pb.UploadHeader(size_bytes=size_bytes, sha256=digest))
        yield pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=0, data=os.urandom(64 * 1024)))
        await sent.put(index)
        await hold.wait()

    call = stub.UploadVideo(parts(), metadata=(("authorization", f"Bearer {KEYS[tenant]}"),))
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        await sent.put(-1)
        return exc


def test_idle_upload_streams_of_a_key_are_capped(stack_factory, redis_url):
    cap = 4
    # A clean database: pending bytes, upload states and failed-auth counts of earlier tests of the
    # session (same tenants, same loopback peer) must not count here.
    with stack_factory(workers=0, api_keys=key_spec(), max_open_uploads=cap, redis_url=redis_url) as s:
        async def scenario():
            async with grpc.aio.insecure_channel(s.target) as channel:
                stub = pb_grpc.MomentsStub(channel)
                sent, hold = asyncio.Queue(), asyncio.Event()
                streams = [asyncio.create_task(_open_idle(stub, "alice", i, 4 * MiB, sent, hold)) for i in range(cap)]
                assert sorted([await sent.get() for _ in streams]) == list(range(cap))
                refused = await _open_idle(stub, "alice", cap, 4 * MiB, asyncio.Queue(), hold)
                other = asyncio.create_task(_open_idle(stub, "bob", 0, 4 * MiB, sent, hold))
                assert await sent.get() == 0  # another tenant is not held back by alice's cap
                hold.set()
                ended = await asyncio.gather(*streams, other)
                return refused, ended
        refused, ended = asyncio.run(scenario())
        assert quota(refused) == ("open_uploads", 5.0)
        assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in ended)  # incomplete: resumable
        assert len(staged_uploads(s)) == cap + 1  # the accepted streams' files; none of the refused one


def test_pending_upload_bytes_of_a_key_are_capped(stack_factory):
    with stack_factory(workers=0, api_keys=key_spec(), max_pending_upload_bytes=5 * MiB) as s:
        async def one(tenant: str, index: int, size_bytes: int):
            async with grpc.aio.insecure_channel(s.target) as channel:
                hold = asyncio.Event()
                hold.set()
                return await _open_idle(pb_grpc.MomentsStub(channel), tenant, index, size_bytes, asyncio.Queue(), hold)
        first = asyncio.run(one("alice", 0, 4 * MiB))
        assert first.code() == grpc.StatusCode.FAILED_PRECONDITION  # cut: 4 MiB stay pending
        assert quota(asyncio.run(one("alice", 1, 2 * MiB))) == ("pending_upload_bytes", 60.0)
        assert asyncio.run(one("alice", 0, 4 * MiB)).code() == grpc.StatusCode.FAILED_PRECONDITION  # resumes
        assert asyncio.run(one("bob", 0, 2 * MiB)).code() == grpc.StatusCode.FAILED_PRECONDITION


# ------------------------------------------------------------------ throttled failed authentication


def test_failed_authentication_is_throttled_without_telling_keys_apart(stack_factory, redis_url):
    with stack_factory(workers=0, api_keys=key_spec(), auth_failures_max=3, auth_failure_window_s=2.0,
                       redis_url=redis_url) as s:
        def call(key: str) -> grpc.RpcError | None:
            with MomentsClient(s.target, api_key=key) as client:
                try:
                    list(client.list_videos())
                except grpc.RpcError as exc:
                    return exc
            return None

        assert call(KEYS["alice"]) is None
        for attempt in range(3):
            assert call(f"guess-{attempt}").code() == grpc.StatusCode.UNAUTHENTICATED
        # The peer is locked out: a right key, a wrong key and a guessed one get the same answer.
        refused = [call(KEYS["alice"]), call("guess-0"), call("guess-new")]
        assert {quota(exc) for exc in refused} == {("failed_auth", 2.0)}
        assert len({exc.details() for exc in refused}) == 1
        time.sleep(2.2)
        assert call(KEYS["alice"]) is None


def test_peer_host_drops_the_port():
    assert peer_host("ipv4:10.1.2.3:50000") == "ipv4:10.1.2.3"
    assert peer_host("ipv6:[::1]:50000") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"
