"""Uploads on a real front end (no worker): offsets, expiry, a really full disk, races, bad streams.

Resuming after a cut stream is covered end to end in ``test_service``; these tests pin down the
rules around it: the server alone says where a client continues, and the committed offset only
grows; nothing half-written outlives an abandoned upload, a full disk or a race.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings, strategies as st

from moments.core import keys
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc
from moments.service.auth import hash_key
from moments.service.uploads import MAX_CHUNK_BYTES
from tests.stack import staged_uploads, stored_blob_ids

KEYS = {"alice": "alice-secret", "bob": "bob-secret"}
API_KEYS = ",".join(f"{tenant}:{hash_key(key)}" for tenant, key in KEYS.items())


def md(tenant: str = "alice") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[tenant]}")]


@pytest.fixture(scope="module")
def front(redis_server, stack_factory):
    redis_server.client().flushall()
    with stack_factory(workers=0, api_keys=API_KEYS) as s:
        yield s


@pytest.fixture(scope="module")
def stub(front):
    with grpc.insecure_channel(front.target) as channel:
        yield pb_grpc.MomentsStub(channel)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Small real videos, each of different bytes (so no test sees another's blob)."""
    root = tmp_path_factory.mktemp("videos")
    kinds = [(c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]
    return [write_event_video(root / f"{c}-{s}.mp4", [Event(c, s, 1.0, 2.0)], seconds=4, fps=6)
            .read_bytes() for c, s in kinds]


def header(data: bytes, **fields) -> pb.UploadVideoRequest:
    h = pb.UploadHeader(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        filename="v.mp4", content_type="video/mp4", **fields)
    return pb.UploadVideoRequest(header=h)


def chunk(offset: int, data: bytes) -> pb.UploadVideoRequest:
    return pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=offset, data=data))


def chunks(data: bytes, start: int = 0, step: int = 4096):
    return [chunk(o, data[o:o + step]) for o in range(start, len(data), step)]


def upload(stub, messages, tenant: str = "alice", timeout_s: float = 60) -> pb.UploadVideoResponse:
    return stub.UploadVideo(iter(messages), metadata=md(tenant), timeout=timeout_s)


def refused(stub, messages, tenant: str = "alice") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        upload(stub, messages, tenant)
    return err.value


def detail(exc: grpc.RpcError, kind):
    status = rpc_status.from_call(exc)
    for d in status.details if status else ():
        if d.Is(kind.DESCRIPTOR):
            message = kind()
            d.Unpack(message)
            return message
    return None


def committed_of(exc: grpc.RpcError) -> tuple[int, str]:
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
    info = detail(exc, error_details_pb2.ErrorInfo)
    assert info is not None, "FAILED_PRECONDITION without ErrorInfo"
    return int(info.metadata["committed_bytes"]), info.metadata["upload_id"]


def field_of(exc: grpc.RpcError) -> str:
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
    return detail(exc, error_details_pb2.BadRequest).field_violations[0].field


def part_files(stack) -> set[Path]:
    return set(stack.settings.upload_dir.glob("*.part"))


def start_partial(stub, data: bytes, prefix_bytes: int, tenant: str = "alice") -> str:
    """Commit the first ``prefix_bytes`` of ``data`` and end the stream; returns the upload id."""
    err = refused(stub, [header(data), *chunks(data[:prefix_bytes])], tenant)
    committed, upload_id = committed_of(err)
    assert committed == prefix_bytes
    return upload_id


def get_committed(stub, upload_id: str, tenant: str = "alice") -> int:
    return stub.GetUpload(pb.GetUploadRequest(upload_id=upload_id), metadata=md(tenant)).committed_bytes


def wait_until(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------ offsets


def test_chunk_at_a_wrong_offset_gets_failed_precondition_with_the_committed_offset(front, stub, videos):
    data = videos[0]
    upload_id = start_partial(stub, data, 8192)
    part = front.settings.upload_dir / f"{upload_id}.part"
    for offset in (0, 4096, 8191, 8193, len(data) - 10):  # rewrite, behind, gap, far ahead
        err = refused(stub, [header(data), chunk(offset, data[offset:offset + 10])])
        assert committed_of(err) == (8192, upload_id), offset
        assert get_committed(stub, upload_id) == 8192
        assert part.read_bytes() == data[:8192], "a refused chunk changed the committed bytes"
    # The same with the upload id in the header, as a resuming client sends it.
    err = refused(stub, [header(data, upload_id=upload_id), chunk(0, data[:10])])
    assert committed_of(err) == (8192, upload_id)
    done = upload(stub, [header(data, upload_id=upload_id), *chunks(data, start=8192)])
    assert done.video.video_id == hashlib.sha256(data).hexdigest() and not done.deduplicated
    assert not part.exists()


OPS = st.lists(  # each stream: chunks given as (offset delta from the committed offset, length)
    st.lists(st.tuples(st.sampled_from([0, 0, 0, -1, 1, -100]), st.integers(0, 3000)),
             min_size=0, max_size=4),
    min_size=1, max_size=5,
)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams=OPS)
def test_committed_offset_only_grows(front, stub, streams):
    """Whatever offsets a client sends, the server keeps exactly the longest valid prefix."""
    data = os.urandom(100_000)  # never completed, so never probed
    upload_id = start_partial(stub, data, 1000)
    expected = 1000
    for stream in streams:
        messages, model = [header(data)], expected
        for delta, length in stream:
            offset = max(0, model + delta)
            messages.append(chunk(offset, data[offset:offset + length]))
            if offset != model:
                break  # the server stops the stream at the first wrong offset
            model += len(data[offset:offset + length])
        with pytest.raises(grpc.RpcError) as err:
            upload(stub, messages)
        committed, _ = committed_of(err.value)
        assert committed == model >= expected
        expected = model
        assert get_committed(stub, upload_id) == expected
    part = front.settings.upload_dir / f"{upload_id}.part"
    assert part.read_bytes() == data[:expected]


# ------------------------------------------------------------------------------ bad streams


def test_oversize_chunk_and_data_beyond_the_declared_size_are_invalid_argument(front, stub, videos):
    data = videos[1]
    upload_id = start_partial(stub, data, 4096)
    big = bytes(MAX_CHUNK_BYTES + 1)  # still under the 2 MiB gRPC message limit
    err = refused(stub, [header(data), chunk(4096, big)])
    assert field_of(err) == "chunk.data" and "exceeds" in err.details()
    beyond = data[4096:] + b"\0"
    err = refused(stub, [header(data), chunk(4096, beyond)])
    assert field_of(err) == "chunk.data" and "beyond the declared size" in err.details()
    assert get_committed(stub, upload_id) == 4096
    # A fresh upload whose very first chunk is longer than the whole declared size.
    small = b"\1" * 100
    err = refused(stub, [header(small), chunk(0, small + b"x")])
    assert field_of(err) == "chunk.data"
    # The rest of the real upload still goes through.
    done = upload(stub, [header(data), *chunks(data, start=4096)])
    assert done.video.video_id == hashlib.sha256(data).hexdigest()


def test_streams_without_a_leading_header_are_invalid_argument(front, stub, videos):
    data = videos[2]
    before = part_files(front)
    for messages in ([], [chunk(0, data[:100])], [chunk(0, data[:100]), header(data)]):
        assert field_of(refused(stub, messages)) == "header"
    # A second header after the first is refused too, and commits nothing after it.
    err = refused(stub, [header(data), chunk(0, data[:100]), header(data), chunk(100, data[100:200])])
    assert field_of(err) == "header"
    err = refused(stub, [header(data), chunk(0, data[:10])])
    assert committed_of(err)[0] == 100
    assert part_files(front) - before == {front.settings.upload_dir / f"{committed_of(err)[1]}.part"}


def test_header_with_an_upload_id_of_other_bytes_is_invalid_argument(stub, videos):
    upload_id = start_partial(stub, videos[3], 100)
    err = refused(stub, [header(videos[4], upload_id=upload_id), chunk(100, videos[4][100:200])])
    assert field_of(err) == "header.upload_id"
    assert get_committed(stub, upload_id) == 100


# ----------------------------------------------------------------------------------- expiry


@pytest.fixture(scope="module")
def short_ttl(stack_factory):
    """A front end whose partial uploads expire one second after their stream ends."""
    with stack_factory(workers=0, api_keys=API_KEYS, upload_ttl_s=1) as s, \
            grpc.insecure_channel(s.target) as channel:
        yield s, pb_grpc.MomentsStub(channel)


def expired(s, upload_id: str) -> bool:
    """The upload's recorded expiry is in the past (what the janitor looks at)."""
    score = redis.Redis.from_url(s.settings.redis_url).zscore(keys.UPLOADS_BY_EXPIRY, upload_id)
    return score is not None and score < time.time()


def test_abandoned_partial_upload_expires_and_is_removed(short_ttl, videos):
    s, stub = short_ttl
    data = videos[5]
    upload_id = start_partial(stub, data, 4096)
    part = s.settings.upload_dir / f"{upload_id}.part"
    assert part.exists()
    wait_until(lambda: expired(s, upload_id), "the upload's expiry passed")
    s.run(s.stack.front.uploads.expire_abandoned())
    assert not part.exists()
    with pytest.raises(grpc.RpcError) as err:
        get_committed(stub, upload_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    r = redis.Redis.from_url(s.settings.redis_url)
    assert r.zscore(keys.UPLOADS_BY_EXPIRY, upload_id) is None and not r.exists(keys.upload(upload_id))
    # The same bytes start over from 0 and succeed.
    err = refused(stub, [header(data), chunk(4096, data[4096:5000])])
    assert committed_of(err)[0] == 0
    assert upload(stub, [header(data), *chunks(data)]).video.video_id == hashlib.sha256(data).hexdigest()


def test_janitor_leaves_an_upload_that_a_stream_is_writing_alone(short_ttl, videos):
    s, stub = short_ttl
    data = videos[6]
    go_on = threading.Event()
    first = 4096

    def slow_stream():
        yield header(data)
        yield chunk(0, data[:first])
        assert go_on.wait(30)
        yield from chunks(data, start=first)

    box = {}
    thread = threading.Thread(target=lambda: box.update(r=upload(stub, slow_stream())))
    thread.start()
    try:
        wait_until(lambda: any(p.stat().st_size >= first for p in part_files(s)), "the first chunk landed")
        upload_id = next(iter(part_files(s))).stem
        wait_until(lambda: expired(s, upload_id), "the expiry set when the stream started passed")
        removed = s.run(s.stack.front.uploads.expire_abandoned())
        assert removed == 0
        assert len(part_files(s)) == 1
    finally:
        go_on.set()
        thread.join(60)
    assert box["r"].video.video_id == hashlib.sha256(data).hexdigest()
    assert part_files(s) == set()


# -------------------------------------------------------------------------------- disk full


@pytest.fixture
def full_disk(stack_factory, tmp_path):
    """A front end whose data directory is a real 1 MiB tmpfs."""
    data_dir = tmp_path / "small"
    data_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        with stack_factory(workers=0, data_dir=data_dir, api_keys=API_KEYS) as s, \
                grpc.insecure_channel(s.target) as channel:
            yield s, pb_grpc.MomentsStub(channel), data_dir
    finally:
        subprocess.run(["umount", str(data_dir)], check=True)


def used_bytes(path: Path) -> int:
    st_ = os.statvfs(path)
    return (st_.f_blocks - st_.f_bfree) * st_.f_frsize


def test_disk_full_gives_resource_exhausted_and_leaves_no_partial_file(full_disk, videos):
    s, stub, data_dir = full_disk
    idle = used_bytes(data_dir)
    r = redis.Redis.from_url(s.settings.redis_url)
    pending = set(r.zrange(keys.UPLOADS_BY_EXPIRY, 0, -1))
    data = os.urandom(2 * 1024 * 1024)  # twice the disk
    err = refused(stub, [header(data), *chunks(data, step=256 * 1024)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert detail(err, error_details_pb2.RetryInfo) is not None
    assert part_files(s) == set()
    assert used_bytes(data_dir) == idle, "the partial file's space was not given back"
    assert set(r.zrange(keys.UPLOADS_BY_EXPIRY, 0, -1)) == pending, "the dropped upload is still listed"
    # The front end is fine and a video that fits goes through.
    assert upload(stub, [header(videos[7]), *chunks(videos[7])]).video.video_id == \
        hashlib.sha256(videos[7]).hexdigest()


# ------------------------------------------------------------------------------------- races


def upload_retrying(stub, data: bytes, tenant: str, barrier: threading.Barrier) -> pb.UploadVideoResponse:
    """What a well-behaved client does: resume where the server says, wait while another writes."""
    offset = 0
    barrier.wait(10)
    deadline = time.monotonic() + 60
    while True:
        try:
            return upload(stub, [header(data), *chunks(data, start=offset, step=2048)], tenant)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            info = detail(exc, error_details_pb2.ErrorInfo)
            if info is not None and info.reason == "WRONG_OFFSET":
                offset = int(info.metadata["committed_bytes"])
            else:  # UPLOAD_BUSY: another stream holds this upload
                time.sleep(0.05)


@pytest.fixture(scope="module")
def s3_front(redis_server, stack_factory):
    """The same front end with its blobs in an S3 bucket (moto's server)."""
    with stack_factory(workers=0, api_keys=API_KEYS, blob_backend="s3") as s, \
            grpc.insecure_channel(s.target) as channel:
        yield s, pb_grpc.MomentsStub(channel)


@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("tenants", [("alice", "alice", "alice"), ("alice", "bob", "bob")],
                         ids=["same-tenant", "two-tenants"])
def test_concurrent_uploads_of_the_same_bytes_end_in_one_blob(request, backend, tenants, tmp_path):
    front, stub = (request.getfixturevalue("front"), request.getfixturevalue("stub")) if backend == "local" \
        else request.getfixturevalue("s3_front")
    data = write_event_video(tmp_path / "race.mp4", [Event("red", "triangle", 0.5, 1.5)],
                             seconds=3, fps=5, width=160, height=120).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    before = staged_uploads(front)
    barrier = threading.Barrier(len(tenants))
    results: list = [None] * len(tenants)

    def run(i: int, tenant: str) -> None:
        try:
            results[i] = upload_retrying(stub, data, tenant, barrier)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(tenants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(isinstance(r, pb.UploadVideoResponse) for r in results), results
    assert {r.video.video_id for r in results} == {sha}
    assert stored_blob_ids(front).count(sha) == 1
    with front.stack.front.uploads.blobs.reader(sha) as blob:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
    assert staged_uploads(front) == before, "a partial file was left behind"
    for tenant in set(tenants):
        assert stub.GetVideo(pb.GetVideoRequest(video_id=sha), metadata=md(tenant)).video_id == sha


def test_a_front_end_dead_mid_upload_holds_the_resume_back_seconds_not_a_minute(front, stub, tmp_path):
    """A front end SIGKILLed mid-upload leaves its writer lock behind (the chaos soak found a client
    giving up on UPLOAD_BUSY for a minute). The lock lasts LOCK_TTL_S past its last refresh, the
    busy answer carries a RetryInfo of the time left, and the client library waits that long and
    resumes: the same client call succeeds."""
    from moments.app.client import MomentsClient
    from moments.service.uploads import LOCK_TTL_S

    path = write_event_video(tmp_path / "dead-front.mp4", [Event("blue", "triangle", 0.5, 1.5)],
                             seconds=3, fps=5, width=160, height=120)
    data = path.read_bytes()
    committed, upload_id = committed_of(refused(stub, [header(data), chunk(0, data[:2048])]))
    assert committed == 2048
    r = redis.Redis.from_url(front.settings.redis_url)
    r.set(keys.upload_writer(upload_id), "a-front-end-that-was-killed", ex=LOCK_TTL_S)  # what it leaves
    busy = refused(stub, [header(data), chunk(2048, data[2048:])])
    assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert detail(busy, error_details_pb2.ErrorInfo).reason == "UPLOAD_BUSY"
    retry = detail(busy, error_details_pb2.RetryInfo)
    assert retry is not None and 0 < retry.retry_delay.ToMilliseconds() <= LOCK_TTL_S * 1000
    started = time.monotonic()
    with MomentsClient(front.target, api_key=KEYS["alice"], state_path=tmp_path / "state.json") as client:
        response = client.upload(path)  # the default 5 attempts
    assert response.video.video_id == hashlib.sha256(data).hexdigest()
    assert time.monotonic() - started <= LOCK_TTL_S + 5


def test_a_live_stream_keeps_its_writer_lock_past_the_ttl(front, stub, tmp_path):
    """The hold is refreshed in the background while its stream lives, even with no chunk for longer
    than LOCK_TTL_S: nobody else may take the upload from a slow but live client."""
    from moments.service.uploads import LOCK_TTL_S

    data = write_event_video(tmp_path / "slow.mp4", [Event("yellow", "triangle", 0.5, 1.5)],
                             seconds=3, fps=5, width=160, height=120).read_bytes()
    r = redis.Redis.from_url(front.settings.redis_url)
    seen: dict[str, float] = {}

    def slow():
        yield header(data)
        yield chunk(0, data[:1024])
        started = time.monotonic()
        while time.monotonic() - started < LOCK_TTL_S + 2:
            for name in r.scan_iter(match=f"{keys.PREFIX}:upload:*:writer"):
                seen["ttl_s"] = min(seen.get("ttl_s", LOCK_TTL_S), r.ttl(name))
                seen["held_s"] = time.monotonic() - started
            time.sleep(0.5)
        yield from chunks(data, start=1024)

    assert upload(stub, slow()).video.video_id == hashlib.sha256(data).hexdigest()
    assert seen["held_s"] >= LOCK_TTL_S + 1, "the lock lapsed while its stream was alive"
    assert seen["ttl_s"] > 0


def _probe_children() -> int:
    """Probe children of this process (the test's front end runs in it), not other tests' on the host."""
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == os.getpid() and b"moments.media.probe\0--child" in (proc / "cmdline").read_bytes():
                    count += 1
            except (OSError, IndexError, ValueError):
                pass
    return count


def test_a_burst_of_uploads_probes_a_few_at_a_time(stack_factory, tmp_path):
    """32 uploads at once on 2 cores started 32 probe children, which starved each other past the
    probe's time limit and failed as INVALID_ARGUMENT (the chaos soak). The front end runs at most
    max_probes of them; the others wait (not counted in probe_timeout_s), and every upload is stored."""
    datas = [write_event_video(tmp_path / f"burst-{i}.mp4", [Event("green", "triangle", 0.5, 1.5 + i / 10)],
                               seconds=3, fps=5, width=160, height=120).read_bytes() for i in range(6)]
    most = []
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            most.append(_probe_children())
            time.sleep(0.01)

    with stack_factory(workers=0, max_probes=1) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.MomentsStub(channel)
        sampler = threading.Thread(target=sample)
        sampler.start()
        boxes = []
        threads = []
        for data in datas:
            box: dict = {}
            boxes.append(box)
            threads.append(threading.Thread(target=lambda d=data, b=box: b.update(
                response=stub.UploadVideo(iter([header(d), *chunks(d)]), timeout=120))))
            threads[-1].start()
        for thread in threads:
            thread.join(120)
        sampling.set()
        sampler.join()
    assert [b["response"].video.video_id for b in boxes] == [hashlib.sha256(d).hexdigest() for d in datas]
    assert max(most) == 1, f"probe children seen at once: {max(most)}"
