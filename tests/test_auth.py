"""API keys, tenants and quotas on a real front end (no worker needed)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moments.app.client import MomentsClient
from moments.tools.synthetic import Event, write_event_video
from moments.service.auth import hash_key

KEYS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}


@pytest.fixture(scope="module")
def front(redis_server, stack_factory):
    redis_server.client().flushall()
    spec = ",".join([
        f"alice:{hash_key(KEYS['alice'])}",
        f"bob:{hash_key(KEYS['bob'])}",
        f"carol:{hash_key(KEYS['carol'])}:2",  # 2 requests per second
    ])
    with stack_factory(workers=0, api_keys=spec) as s:
        yield s


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_event_video(tmp_path_factory.mktemp("v") / "a.mp4", [Event("red", "square", 1, 2)],
                             seconds=4, fps=4)


def test_missing_and_wrong_keys_are_unauthenticated(front):
    for key in (None, "not-a-key"):
        with MomentsClient(front.target, api_key=key) as client:
            with pytest.raises(grpc.RpcError) as err:
                list(client.list_videos())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_key(front):
    with grpc.insecure_channel(front.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # answered: no worker runs


def test_videos_belong_to_their_tenant(front, video, tmp_path, monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    with MomentsClient(front.target, api_key=KEYS["alice"]) as alice, \
            MomentsClient(front.target, api_key=KEYS["bob"]) as bob:
        video_id = alice.upload(video).video.video_id
        with pytest.raises(grpc.RpcError) as err:
            bob.get_video(video_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert video_id not in [v.video_id for v in bob.list_videos()]
        # Bob must send the bytes himself: no short cut reveals that Alice has them.
        second = bob.upload(video)
        assert not second.deduplicated and second.video.video_id == video_id
        blobs = [p for p in front.settings.blob_dir.rglob("*") if p.is_file()]
        assert len(blobs) == 1
        bob.delete_video(video_id)
        assert alice.get_video(video_id).video_id == video_id
        assert blobs[0].exists(), "Alice still owns the blob"


def test_rate_quota_gives_resource_exhausted_with_retry_info(front):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with MomentsClient(front.target, api_key=KEYS["carol"]) as carol:
        codes = []
        for _ in range(6):
            try:
                list(carol.list_videos())
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                last = exc
        assert "RESOURCE_EXHAUSTED" in codes and codes[0] == "OK"
        details = rpc_status.from_call(last).details
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)


@pytest.mark.slow
def test_last_owners_delete_cannot_take_the_blob_from_anothers_upload(front, tmp_path, monkeypatch):
    """Alice, the last owner, deletes a video while Bob uploads the same bytes. Whatever the
    interleaving, Bob's upload must end with his video stored: here the delete is held just before it
    unlinks the blob, the moment a finished upload of the same bytes would otherwise be lost."""
    import threading

    from moments.service import uploads
    from moments.core.blobs import LocalBlobStore

    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    video = write_event_video(tmp_path / "race.mp4", [Event("blue", "circle", 1, 3)], seconds=4, fps=4)
    deleting, go, probed = threading.Event(), threading.Event(), threading.Event()
    unlink, probe = LocalBlobStore.delete, uploads.probe_file_async

    def held_delete(self, sha256):
        deleting.set()
        go.wait(10)
        unlink(self, sha256)

    async def signalling_probe(*args, **kwargs):
        info = await probe(*args, **kwargs)
        probed.set()
        return info

    monkeypatch.setattr(LocalBlobStore, "delete", held_delete)
    monkeypatch.setattr(uploads, "probe_file_async", signalling_probe)
    with MomentsClient(front.target, api_key=KEYS["alice"]) as alice, \
            MomentsClient(front.target, api_key=KEYS["bob"]) as bob:
        video_id = alice.upload(video).video.video_id
        probed.clear()
        delete = threading.Thread(target=alice.delete_video, args=(video_id,))
        delete.start()
        assert deleting.wait(10)
        outcome = {}
        upload = threading.Thread(target=lambda: outcome.update(bob=bob.upload(video)))
        upload.start()
        assert probed.wait(15)
        upload.join(1.0)  # without the video lock Bob's upload finishes here, before the unlink
        go.set()
        delete.join(15)
        upload.join(15)
        assert outcome["bob"].video.video_id == video_id
        assert bob.get_video(video_id).video_id == video_id
        assert [p for p in front.settings.blob_dir.rglob(video_id) if p.is_file()], "Bob's blob was deleted"
        with pytest.raises(grpc.RpcError) as err:
            alice.get_video(video_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
