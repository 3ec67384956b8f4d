"""Property (issue 20): random requests of two tenants on shared and separate bytes; nothing of
tenant A (its filenames, the video ids only it uploaded, its job ids, its page tokens, cache
outcomes that depend on its work) ever shows in tenant B's responses or error messages.

A real stack with API keys and one worker with the tiny model; each example uploads fresh bytes
(a base video with a random tail), so ids of one example say nothing about another's."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moments.app.client import MomentsClient
from moments.service.auth import hash_key
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb

KEYS = {"alice": "alice-prop-key", "bob": "bob-prop-key"}
OPS = ("upload", "get", "list", "page", "delete", "localize", "localize", "index", "foreign_token")
QUERY = ["the red square appears"]


@pytest.fixture(scope="module")
def world(redis_server, stack_factory, tmp_path_factory):
    redis_server.client().flushall()
    base = write_event_video(tmp_path_factory.mktemp("prop") / "base.mp4", [Event("red", "square", 1, 2)],
                             seconds=4, fps=4)
    spec = ",".join(f"{t}:{hash_key(k)}" for t, k in KEYS.items())
    with stack_factory(workers=1, api_keys=spec) as s, \
            MomentsClient(s.target, api_key=KEYS["alice"], state_path=base.parent / "a.json") as alice, \
            MomentsClient(s.target, api_key=KEYS["bob"], state_path=base.parent / "b.json") as bob:
        yield {"alice": alice, "bob": bob}, base, {"filenames": set(), "job_ids": set()}


def text_of(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)
    return f"{exc.details()} {status}"


class Example:
    """One example's state: what each tenant did, and everything Bob was shown."""

    def __init__(self, clients, base, alice_seen, folder) -> None:
        self.clients, self.alice_seen, self.folder = clients, alice_seen, folder
        self.paths = []
        for i in range(2):
            path = folder / f"v{i}.mp4"
            path.write_bytes(base.read_bytes() + os.urandom(64))  # fresh bytes, same video
            self.paths.append(path)
        self.ids: list[str | None] = [None, None]
        self.owned = {"alice": set(), "bob": set()}
        self.uploaded = {"alice": set(), "bob": set()}
        self.bob_asked: set[int] = set()
        self.alice_token = ""
        self.bob_text: list[str] = []

    def shown_to(self, actor: str, thing) -> None:
        if actor == "bob":
            self.bob_text.append(str(thing))

    def run(self, actor: str, op: str, v: int) -> None:
        client = self.clients[actor]
        known = v in self.uploaded[actor]
        try:
            if op == "upload":
                name = f"{actor}-secret-{uuid.uuid4().hex[:8]}.mp4"
                path = self.folder / name
                path.write_bytes(self.paths[v].read_bytes())
                reply = client.upload(path)
                if actor == "alice":
                    self.alice_seen["filenames"].add(name)
                self.ids[v] = reply.video.video_id
                self.owned[actor].add(v)
                self.uploaded[actor].add(v)
                self.shown_to(actor, reply)
            elif op == "get" and known:
                self.shown_to(actor, client.get_video(self.ids[v]))
            elif op == "list":
                self.shown_to(actor, list(client.list_videos()))
            elif op == "page":
                page = client.stub.ListVideos(pb.ListVideosRequest(page_size=1), metadata=client.metadata)
                if actor == "alice":
                    self.alice_token = page.next_page_token
                self.shown_to(actor, page)
            elif op == "foreign_token" and actor == "bob" and self.alice_token:
                client.stub.ListVideos(pb.ListVideosRequest(page_size=1, page_token=self.alice_token),
                                       metadata=client.metadata)
                raise AssertionError("Bob's server accepted Alice's page token")
            elif op == "delete" and known:
                reply = client.delete_video(self.ids[v])
                if actor == "bob":  # what Bob asked about, whoever else owns the bytes
                    assert reply.cache_entries_removed == (1 if v in self.bob_asked else 0), reply
                    self.bob_asked.discard(v)
                self.owned[actor].discard(v)
                self.shown_to(actor, reply)
            elif op in ("localize", "index") and known:
                if op == "localize":
                    reply = client.localize(self.ids[v], QUERY)
                    job_id, stats = reply.job_id, reply.stats
                else:
                    events = list(client.index(self.ids[v]))
                    job_id, stats, reply = events[0].job_id, events[-1].done, events
                if actor == "alice":
                    self.alice_seen["job_ids"].add(job_id)
                elif v not in self.bob_asked:  # Bob's first look: nothing of Alice's work shows
                    assert stats.cache == pb.CACHE_MISS, stats
                    self.bob_asked.add(v)
                self.shown_to(actor, reply)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), text_of(exc)
            self.shown_to(actor, text_of(exc))

    def check(self) -> None:
        shown = "\n".join(self.bob_text)
        alice_only = {self.ids[v] for v in self.uploaded["alice"] - self.uploaded["bob"]}
        for secret in self.alice_seen["filenames"] | self.alice_seen["job_ids"] | alice_only:
            assert secret not in shown, f"Bob was shown {secret!r}"
        if self.alice_token:
            assert self.alice_token not in shown

    def clean(self) -> None:
        for actor, owned in self.owned.items():
            for v in owned:
                self.clients[actor].delete_video(self.ids[v])


STEPS = st.lists(st.tuples(st.sampled_from(("alice", "bob")), st.sampled_from(OPS), st.integers(0, 1)),
                 min_size=2, max_size=6)


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(share=st.booleans(), steps=STEPS)
def test_nothing_of_one_tenant_reaches_the_other(world, tmp_path_factory, share, steps):
    clients, base, alice_seen = world
    example = Example(clients, base, alice_seen, tmp_path_factory.mktemp("example"))
    # Alice always uploads and asks first, so Bob's steps meet her bytes, names, jobs and warm caches;
    # with ``share`` Bob uploads the same bytes at once.
    opening = [("alice", "upload", 0), ("alice", "localize", 0)] + ([("bob", "upload", 0)] if share else [])
    for actor, op, v in [*opening, *steps]:
        example.run(actor, op, v)
    try:
        example.check()
    finally:
        example.clean()
