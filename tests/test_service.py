"""End to end over real gRPC, a real Redis, real video files and the tiny Qwen2.5-VL, on both blob
stores: the local directory and an S3 bucket on a real S3 server (moto's, on loopback)."""

from __future__ import annotations

import hashlib
import os
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from moments.app.client import MomentsClient
from moments.core.records import SamplingRequest
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb
from tests.conftest import free_port
from tests.media import make_large_video
from tests.stack import staged_uploads, stored_blob_ids


INBOX = "moments-service-inbox"


@pytest.fixture(scope="module", params=["local", "s3"])
def stack(request, redis_server, stack_factory, s3_server):
    redis_server.client().flushall()
    s3 = s3_server.settings("")  # the S3 server as an ingest source, whatever the blob store
    ingest = dict(ingest_s3_buckets=INBOX, **{k: v for k, v in s3.items() if k not in ("blob_backend", "s3_bucket")})
    with stack_factory(metrics_port=free_port(), blob_backend=request.param, **ingest) as s:
        yield s


@pytest.fixture
def client(stack, tmp_path, monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "uploads.json")
    with MomentsClient(stack.target) as c:
        yield c


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "events.mp4"
    return write_event_video(path, [Event("red", "circle", 3.0, 7.0)], seconds=12, fps=8)


def bad_request(exc: grpc.RpcError) -> error_details_pb2.BadRequest:
    status = rpc_status.from_call(exc)
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        if detail.Is(br.DESCRIPTOR):
            detail.Unpack(br)
            return br
    raise AssertionError(f"no BadRequest in {status}")


def blob_files(stack) -> list[str]:
    return stored_blob_ids(stack)


def part_files(stack) -> list[str]:
    return sorted(staged_uploads(stack))


def test_upload_then_localize_two_queries_and_repeat_hits_cache(client, video_file):
    uploaded = client.upload(video_file)
    video = uploaded.video
    assert video.video_id == hashlib.sha256(video_file.read_bytes()).hexdigest()
    assert abs(video.duration.ToNanoseconds() / 1e9 - 12.0) < 0.2
    assert (video.width, video.height) == (224, 168) and video.codec == "h264"

    queries = ["the red circle appears", "the screen goes dark"]
    first = client.localize(video.video_id, queries, timeout_s=120)
    assert [r.query for r in first.results] == queries
    assert [r.query_index for r in first.results] == [0, 1]
    for result in first.results:
        assert isinstance(result.raw_answer, str)
        for seg in result.segments:
            start, end = seg.start_offset.ToNanoseconds() / 1e9, seg.end_offset.ToNanoseconds() / 1e9
            assert 0 <= start < end <= 12.0 + 1e-6
            assert 0.0 <= seg.confidence <= 1.0
    stats = first.stats
    assert stats.cache == pb.CACHE_MISS
    assert stats.frames >= 4 and stats.frames % 2 == 0
    assert abs(2.0 / stats.sampled_fps - round(2.0 / stats.sampled_fps)) < 1e-9
    assert stats.visual_tokens == stats.frames // 2 * (stats.frame_width // 28) * (stats.frame_height // 28)
    assert {"decode", "encode", "prefill", "generate", "total"} <= set(stats.stage_ms)
    assert stats.model and "/" not in stats.model and stats.attempt == 1
    assert not stats.worker  # tenants see no worker name, no path on the worker
    assert stats.weights == "none"  # the tiny model is not quantized

    again = client.localize(video.video_id, queries, timeout_s=120)
    assert again.stats.cache == pb.CACHE_HIT_KV
    assert "decode" not in again.stats.stage_ms and "prefill" not in again.stats.stage_ms
    assert [r.raw_answer for r in again.results] == [r.raw_answer for r in first.results]


def test_index_warms_the_token_cache_for_later_questions(client, video_file):
    video_id = client.upload(video_file).video.video_id
    sampling = SamplingRequest(start_s=2.0, end_s=10.0)
    events = list(client.index(video_id, sampling=sampling, timeout_s=120))
    stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    assert pb.DECODING in stages and pb.ENCODING in stages
    assert events[-1].WhichOneof("event") == "done"
    assert events[-1].done.cache in (pb.CACHE_MISS, pb.CACHE_HIT_TOKENS)
    answer = client.localize(video_id, ["the red circle appears"], sampling=sampling, timeout_s=120)
    assert answer.stats.cache == pb.CACHE_HIT_TOKENS
    assert "decode" not in answer.stats.stage_ms and "prefill" in answer.stats.stage_ms


def test_stream_localize_reports_progress_then_results(client, video_file):
    video_id = client.upload(video_file).video.video_id
    events = list(client.stream_localize(video_id, ["a", "b", "c"], timeout_s=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "progress" and kinds[-1] == "done"
    assert sorted(e.result.query_index for e in events if e.WhichOneof("event") == "result") == [0, 1, 2]


def test_same_bytes_twice_give_same_video_and_one_blob(client, stack, video_file):
    first = client.upload(video_file)
    before = blob_files(stack)
    second = client.upload(video_file)
    assert second.video.video_id == first.video.video_id
    assert second.deduplicated
    assert blob_files(stack) == before


def test_wrong_sha256_is_rejected_and_leaves_no_file(client, stack, tmp_path):
    data = os.urandom(5000)
    header = pb.UploadHeader(size_bytes=len(data), sha256="0" * 64, filename="x.mp4")
    messages = [pb.UploadVideoRequest(header=header),
                pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=0, data=data))]
    with pytest.raises(grpc.RpcError) as err:
        client.stub.UploadVideo(iter(messages))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(err.value).field_violations[0].field == "header.sha256"
    assert part_files(stack) == []
    assert not [b for b in blob_files(stack) if b.startswith("00")]


def test_non_video_is_rejected_with_a_reason(client, stack, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("these are not the frames you are looking for\n" * 100)
    before = blob_files(stack)
    with pytest.raises(grpc.RpcError) as err:
        client.upload(text)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = bad_request(err.value).field_violations[0]
    assert violation.description
    assert part_files(stack) == [] and blob_files(stack) == before


def test_upload_resumes_after_a_cut_stream(client, stack, tmp_path):
    if stack.settings.blob_backend == "local":  # every flushed chunk is committed
        path = write_event_video(tmp_path / "long.mp4", [Event("blue", "square", 1, 3)], seconds=40, fps=10,
                                 width=320, height=240)
        step, sent = 100_000, 2
    else:  # only whole parts are: send two parts and a half, two are committed
        path = make_large_video(tmp_path / "long.mp4", 3 * stack.settings.s3_part_bytes)
        step, sent = 1024 * 1024, 2 * stack.settings.s3_part_bytes // (1024 * 1024) + 2
    data = path.read_bytes()
    committed = 2 * step if stack.settings.blob_backend == "local" else 2 * stack.settings.s3_part_bytes
    assert len(data) > committed + step, "need several chunks"
    sha = hashlib.sha256(data).hexdigest()

    def cut_after_some_chunks():
        yield pb.UploadVideoRequest(header=pb.UploadHeader(size_bytes=len(data), sha256=sha, filename="long.mp4"))
        for i in range(sent):
            yield pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=i * step, data=data[i * step:(i + 1) * step]))
        deadline = time.monotonic() + 10
        while sum(staged_uploads(stack).values()) < committed:
            assert time.monotonic() < deadline, "server never committed the first chunks"
            time.sleep(0.01)
        raise ConnectionResetError("network cut")

    with pytest.raises(grpc.RpcError):
        client.stub.UploadVideo(cut_after_some_chunks())
    # Same header again, without the id: the server says where to continue (UPLOAD_BUSY while it
    # is still closing the cut stream).
    details = error_details_pb2.ErrorInfo()
    deadline = time.monotonic() + 10
    while True:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.UploadVideo(iter([
                pb.UploadVideoRequest(header=pb.UploadHeader(size_bytes=len(data), sha256=sha)),
                pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=0, data=data[:1000])),
            ]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = next(d for d in rpc_status.from_call(err.value).details
                    if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR))
        info.Unpack(details)
        if details.reason != "UPLOAD_BUSY" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert details.reason == "WRONG_OFFSET"
    assert int(details.metadata["committed_bytes"]) == committed
    upload = client.stub.GetUpload(pb.GetUploadRequest(upload_id=details.metadata["upload_id"]))
    assert upload.committed_bytes == committed and upload.size_bytes == len(data)

    received_before = REGISTRY.get_sample_value("moments_upload_bytes_total") or 0.0
    response = client.upload(path)
    assert response.video.video_id == sha and not response.deduplicated
    received = REGISTRY.get_sample_value("moments_upload_bytes_total") - received_before
    assert received == len(data) - committed, "the client resent committed bytes"
    assert sha in blob_files(stack)
    with stack.stack.front.uploads.blobs.reader(sha) as blob:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
    assert part_files(stack) == []


def test_list_get_delete(client, stack, video_file):
    video_id = client.upload(video_file).video.video_id
    client.localize(video_id, ["x"], timeout_s=120)
    assert video_id in [v.video_id for v in client.list_videos()]
    assert client.get_video(video_id).video_id == video_id
    removed = client.delete_video(video_id)
    assert removed.cache_entries_removed >= 1
    with pytest.raises(grpc.RpcError) as err:
        client.get_video(video_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert video_id not in blob_files(stack)


def test_bad_requests_get_invalid_argument(client, video_file):
    video_id = client.upload(video_file).video.video_id
    for queries, field in (([], "queries"), (["x" * 10_000], "queries[0]"), (["   "], "queries[0]")):
        with pytest.raises(grpc.RpcError) as err:
            client.localize(video_id, queries, timeout_s=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(err.value).field_violations[0].field == field
    with pytest.raises(grpc.RpcError) as err:
        client.localize("f" * 64, ["x"], timeout_s=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_serving_and_reflection_lists_the_service(stack):
    with grpc.insecure_channel(stack.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "moments.v1.Moments"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "moments.v1.Moments" in names and "grpc.health.v1.Health" in names


def test_metrics_endpoint_counts_requests_stages_and_cache(client, stack, video_file):
    import urllib.request

    video_id = client.upload(video_file).video.video_id
    client.localize(video_id, ["metrics"], timeout_s=120)
    body = urllib.request.urlopen(f"http://127.0.0.1:{stack.settings.metrics_port}/metrics", timeout=5).read().decode()
    assert 'moments_requests_total{code="OK",method="Localize"}' in body
    assert 'moments_stage_seconds_count{stage="generate"}' in body
    assert "moments_token_cache_total" in body and "moments_queue_jobs" in body


def test_questions_in_any_language_or_form_get_an_answer_and_symbols_a_reason(client, video_file):
    """Other languages, scripts, case and bare phrases are questions like any other (an answer: found
    with segments inside the video, or found: false); a query of only punctuation, symbols or emoji is
    INVALID_ARGUMENT naming it."""
    video_id = client.upload(video_file).video.video_id
    queries = ["¿Cuándo aparece el círculo rojo?", "赤い円はいつ現れますか", "RED CIRCLE", "red circle",
               "Когда появляется красный круг?", "a red circle 🔴 appears"]
    response = client.localize(video_id, queries, timeout_s=120)
    assert [r.query for r in response.results] == queries
    for r in response.results:
        assert r.found == bool(r.segments) and 0.0 <= r.score <= 1.0
        assert all(0 <= s.start_offset.ToNanoseconds() < s.end_offset.ToNanoseconds() <= 12.0e9 + 1e6
                   for s in r.segments)
    for junk in ["?!...", "🔴🔵", "—"]:
        with pytest.raises(grpc.RpcError) as err:
            client.localize(video_id, ["the red circle appears", junk], timeout_s=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad_request(err.value).field_violations] == ["queries[1]"]
        assert "letter or digit" in err.value.details()


def test_an_ingested_video_is_answered_like_an_uploaded_one(client, stack, s3_server, tmp_path):
    path = write_event_video(tmp_path / "inbox.mp4", [Event("green", "square", 2.0, 5.0)], seconds=8, fps=8)
    s3 = s3_server.client()
    if INBOX not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=INBOX)
    s3.put_object(Bucket=INBOX, Key="clips/inbox.mp4", Body=path.read_bytes())
    video = client.ingest(f"s3://{INBOX}/clips/inbox.mp4", timeout_s=60).video
    assert video.video_id == hashlib.sha256(path.read_bytes()).hexdigest() and video.filename == "inbox.mp4"
    answer = client.localize(video.video_id, ["the green square appears"], timeout_s=120)
    assert answer.stats.frames >= 4 and answer.results[0].raw_answer is not None
    assert video.video_id in blob_files(stack)
