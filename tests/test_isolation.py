"""Tenants see nothing of each other (issue 20): per-owner video metadata, opaque page tokens,
validation at the front end, per-tenant upload caps and throttled failed authentication, on a real
front end with API keys (no worker: nothing here runs a job)."""

from __future__ import annotations

import shutil

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from moments.app.client import MomentsClient
from moments.service.auth import hash_key
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc

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
