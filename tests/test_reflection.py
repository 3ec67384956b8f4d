"""A client that knows nothing but server reflection, as grpcurl: it fetches the file descriptors from
the server (v1 and v1alpha), builds every message from JSON at run time, calls every RPC of every
service, and reads the comments that came with the descriptors."""

from __future__ import annotations

import base64
import hashlib

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from moments.tools.synthetic import Event, write_event_video

VERSIONS = ("v1", "v1alpha")


class ReflectionClient:
    """Descriptors from ``grpc.reflection.<version>`` into a fresh pool; JSON in, JSON out.

    The reflection messages of v1 and v1alpha are the same on the wire, so one pair of classes
    speaks both (grpcurl does the same)."""

    def __init__(self, channel: grpc.Channel, version: str) -> None:
        self.channel = channel
        self.info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        self.pool = descriptor_pool.DescriptorPool()
        self.files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def ask(self, **request) -> reflection_pb2.ServerReflectionResponse:
        [reply] = list(self.info(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10))
        assert not reply.HasField("error_response"), reply.error_response
        return reply

    def services(self) -> list[str]:
        return [s.name for s in self.ask(list_services="").list_services_response.service]

    def load(self, symbol: str) -> None:
        reply = self.ask(file_containing_symbol=symbol)
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in reply.file_descriptor_response.file_descriptor_proto]
        pending = {f.name: f for f in files if f.name not in self.files}
        while pending:  # add each file after its dependencies
            ready = [f for f in pending.values() if all(d in self.files for d in f.dependency)]
            assert ready, f"unresolvable dependencies among {list(pending)}"
            for f in ready:
                self.pool.Add(f)
                self.files[f.name] = pending.pop(f.name)

    def comment(self, symbol: str) -> str:
        """The leading comment of a service, method, message or field, from the source info."""
        try:
            file = self.files[self.pool.FindFileContainingSymbol(symbol).name]
        except KeyError:  # a method: its service's file
            file = self.files[self.pool.FindFileContainingSymbol(symbol.rsplit(".", 1)[0]).name]
        path = _symbol_path(file, symbol)
        for location in file.source_code_info.location:
            if tuple(location.path) == path:
                return location.leading_comments.strip()
        return ""

    def call(self, method: str, requests: list[dict], *, first_only: bool = False):
        """Call ``Service/Method`` with JSON requests; returns the JSON replies (a list for streams)."""
        service_name, method_name = method.rsplit("/", 1)
        m = self.pool.FindServiceByName(service_name).methods_by_name[method_name]
        request_class = message_factory.GetMessageClass(m.input_type)
        reply_class = message_factory.GetMessageClass(m.output_type)
        messages = [json_format.ParseDict(r, request_class()) for r in requests]
        kind = {(False, False): "unary_unary", (True, False): "stream_unary",
                (False, True): "unary_stream", (True, True): "stream_stream"}[
            (m.client_streaming, m.server_streaming)]
        stub = getattr(self.channel, kind)(f"/{method}", request_serializer=request_class.SerializeToString,
                                          response_deserializer=reply_class.FromString)
        to_json = json_format.MessageToDict
        if kind == "unary_unary":
            return to_json(stub(messages[0], timeout=120))
        if kind == "stream_unary":
            return to_json(stub(iter(messages), timeout=120))
        replies = stub(messages[0] if kind == "unary_stream" else iter(messages), timeout=120)
        if first_only:
            first = next(replies)
            replies.cancel()
            return [to_json(first)]
        return [to_json(r) for r in replies]


def _symbol_path(file: descriptor_pb2.FileDescriptorProto, symbol: str) -> tuple[int, ...]:
    """The SourceCodeInfo path of a top-level service/method or message/field of ``file``."""
    parts = symbol[len(file.package) + 1:].split(".")
    for i, service in enumerate(file.service):
        if service.name == parts[0]:
            if len(parts) == 1:
                return (6, i)
            return (6, i, 2, [m.name for m in service.method].index(parts[1]))
    for i, message in enumerate(file.message_type):
        if message.name == parts[0]:
            if len(parts) == 1:
                return (4, i)
            return (4, i, 2, [f.name for f in message.field].index(parts[1]))
    raise KeyError(symbol)


@pytest.fixture(scope="module")
def front(stack_factory):
    """A front end alone: enough for reflection."""
    with stack_factory(workers=0) as s:
        yield s


@pytest.fixture
def stack(redis_server, stack_factory):
    redis_server.client().flushall()
    with stack_factory() as s:
        yield s


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> bytes:
    path = write_event_video(tmp_path_factory.mktemp("v") / "r.mp4", [Event("red", "circle", 1, 3)],
                             seconds=4, fps=4)
    return path.read_bytes()


@pytest.mark.parametrize("version", VERSIONS)
def test_reflection_lists_every_service_with_comments(front, version):
    with grpc.insecure_channel(front.target) as channel:
        client = ReflectionClient(channel, version)
        services = client.services()
        assert set(services) == {"moments.v1.Moments", "grpc.health.v1.Health",
                                 "grpc.reflection.v1.ServerReflection",
                                 "grpc.reflection.v1alpha.ServerReflection"}
        for name in services:
            client.load(name)
            assert client.pool.FindServiceByName(name).methods
        moments = client.pool.FindServiceByName("moments.v1.Moments")
        about = " ".join(client.comment("moments.v1.Moments").split())
        for documented in ("WRONG_OFFSET", "UPLOAD_BUSY", "JOB_FAILED", "committed_bytes", "upload_id",
                           "job_id", "ABORTED", "RetryInfo", "BadRequest", "grpc-status-details-bin",
                           "500 characters", "16 queries", "1 MiB", "64 characters"):
            assert documented in about, documented
        for method in moments.methods:
            assert client.comment(method.full_name), f"{method.full_name} has no comment"
        assert "FAILED_PRECONDITION" in client.comment("moments.v1.UploadVideoResponse.upload_id")
        assert "1048576" in client.comment("moments.v1.UploadChunk.data")


def test_every_message_and_field_of_the_api_is_commented(front):
    """A field without its own comment must continue a commented group on the lines just above it."""
    with grpc.insecure_channel(front.target) as channel:
        client = ReflectionClient(channel, "v1")
        client.load("moments.v1.Moments")
    file = client.files["moments/v1/moments.proto"]
    locations = {tuple(loc.path): loc for loc in file.source_code_info.location}

    def undocumented(prefix: tuple[int, ...], children: int, kind: int) -> list[int]:
        missing, grouped, last_line = [], False, None
        for j in range(children):
            loc = locations[(*prefix, kind, j)]
            if loc.leading_comments.strip() or loc.trailing_comments.strip():
                grouped = True
            elif not (grouped and last_line is not None and loc.span[0] == last_line + 1):
                missing.append(j)
            last_line = loc.span[2] if len(loc.span) == 4 else loc.span[0]
        return missing

    gaps = []
    for i, message in enumerate(file.message_type):
        if not locations[(4, i)].leading_comments.strip():
            gaps.append(message.name)
        gaps += [f"{message.name}.{message.field[j].name}" for j in undocumented((4, i), len(message.field), 2)]
    for i, enum in enumerate(file.enum_type):
        if not locations[(5, i)].leading_comments.strip():
            gaps.append(enum.name)
        gaps += [f"{enum.name}.{enum.value[j].name}" for j in undocumented((5, i), len(enum.value), 2)]
    assert not gaps, f"uncommented: {gaps}"


@pytest.mark.slow
def test_every_rpc_through_reflection_alone(stack, video):
    """Upload (cut short, GetUpload, resume), read, list, index, ask, stream, search, delete; health too."""
    sha = hashlib.sha256(video).hexdigest()
    half = len(video) // 2
    header = {"header": {"sizeBytes": str(len(video)), "sha256": sha, "filename": "r.mp4"}}

    def chunk(start: int, end: int) -> dict:
        return {"chunk": {"offset": str(start), "data": base64.b64encode(video[start:end]).decode()}}

    with grpc.insecure_channel(stack.target) as channel:
        client = ReflectionClient(channel, "v1")
        for name in client.services():
            client.load(name)
        called = set()

        def call(method: str, *requests: dict, **kw):
            called.add(method)
            return client.call(method, list(requests), **kw)

        M = "moments.v1.Moments"
        with pytest.raises(grpc.RpcError) as cut:  # the stream ends after half the file
            call(f"{M}/UploadVideo", header, chunk(0, half))
        assert cut.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_details_pb2.ErrorInfo()
        assert rpc_status.from_call(cut.value).details[0].Unpack(info) and info.reason == "WRONG_OFFSET"
        upload = call(f"{M}/GetUpload", {"uploadId": info.metadata["upload_id"]})
        assert upload["committedBytes"] == str(half) == info.metadata["committed_bytes"]  # int64: a string
        done = call(f"{M}/UploadVideo", {"header": {"uploadId": upload["uploadId"]}}, chunk(half, len(video)))
        video_id = done["video"]["videoId"]
        assert video_id == sha and done["video"]["duration"].endswith("s")  # a Duration: "4s"

        assert call(f"{M}/GetVideo", {"videoId": video_id})["sizeBytes"] == str(len(video))
        assert [v["videoId"] for v in call(f"{M}/ListVideos", {"pageSize": 10})["videos"]] == [video_id]
        indexed = call(f"{M}/IndexVideo", {"videoId": video_id})
        assert "done" in indexed[-1]
        answer = call(f"{M}/Localize", {"videoId": video_id, "queries": ["a red circle appears"]})
        assert answer["results"][0]["query"] == "a red circle appears" and answer["stats"]["frames"] > 0
        events = call(f"{M}/StreamLocalize", {"videoId": video_id, "queries": ["a red circle appears"]})
        assert "result" in events[-2] and "done" in events[-1]
        search = call(f"{M}/SearchVideos", {"queries": ["a red circle appears"], "videoIds": [video_id, "0" * 64],
                                            "limit": 5})
        assert search[0]["progress"] == {"videosTotal": 2}  # zeros are left out of JSON
        assert search[-2]["progress"] == {"videosDone": 2, "videosTotal": 2}
        assert {"videoId": "0" * 64, "code": "NOT_FOUND"}.items() <= [
            e["videoError"] for e in search if "videoError" in e][0].items()
        assert search[-1]["results"].get("videosAnswered") == 1
        call(f"{M}/DeleteVideo", {"videoId": video_id})
        with pytest.raises(grpc.RpcError) as gone:
            call(f"{M}/GetVideo", {"videoId": video_id})
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as refused:  # the ingest rules answer without a fetch
            call(f"{M}/IngestVideo", {"sourceUri": "file:///etc/passwd"})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        H = "grpc.health.v1.Health"
        assert call(f"{H}/Check", {})["status"] == "SERVING"
        assert call(f"{H}/Watch", {"service": M}, first_only=True)[0]["status"] == "SERVING"
        if "List" in client.pool.FindServiceByName(H).methods_by_name:
            assert call(f"{H}/List", {})["statuses"][M]["status"] == "SERVING"
        for version in VERSIONS:
            reply = call(f"grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                         {"fileByFilename": "moments/v1/moments.proto"})
            assert reply[0]["fileDescriptorResponse"]["fileDescriptorProto"]
        every = {f"{name}/{m.name}" for name in client.services()
                 for m in client.pool.FindServiceByName(name).methods}
    assert called == every
