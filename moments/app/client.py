"""Python client for Moments (sync and asyncio), used by the CLI.

Uploads resume by themselves: the client remembers each file's upload id (by sha256) and, after a
cut stream or a FAILED_PRECONDITION, continues from the server's committed offset.

Calls that run a job (Localize, StreamLocalize, IndexVideo; not SearchVideos) and the video calls retry what the
server calls retryable (:func:`retry_delay_s`): UNAVAILABLE, RESOURCE_EXHAUSTED and ABORTED with a
RetryInfo (JOB_LOST: a failover dropped the job, so calling again resubmits it), waiting the
server's ``retry_delay`` or backing off, at most ``RetryPolicy.attempts`` times. A retried stream
yields each query's result once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator, Sequence

import grpc

from moments.core.records import SamplingRequest
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
DEFAULT_STATE = "~/.cache/moments/uploads.json"
"""Where the client remembers the upload id of each unfinished file (by sha256), to resume it."""
Progress = Callable[[int, int], None]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries retryable errors (``attempts`` 1 = never)."""

    attempts: int = 6
    backoff_s: float = 0.2
    """First wait without a server RetryInfo; doubles per attempt up to ``max_delay_s``."""
    max_delay_s: float = 60.0
    """Longest wait, also for a server's RetryInfo (a full disk asks for 60 s)."""


NO_RETRY = RetryPolicy(attempts=1)


def retry_delay_s(exc: grpc.RpcError, attempt: int, policy: RetryPolicy) -> float | None:
    """Seconds to wait before retrying ``exc`` (the ``attempt``-th failure, from 0), or None when the
    error is not retryable: UNAVAILABLE, RESOURCE_EXHAUSTED and ABORTED carrying a RetryInfo are."""
    code = exc.code() if hasattr(exc, "code") else None
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED):
        return None
    server_delay = _retry_info_s(exc)
    if code == grpc.StatusCode.ABORTED and server_delay is None:
        return None  # JOB_FAILED: the same request fails the same way
    backoff = policy.backoff_s * 2**attempt
    return min(policy.max_delay_s, server_delay if server_delay is not None else backoff)


def _pause_or_raise(exc: grpc.RpcError, attempt: int, policy: RetryPolicy, what: str) -> None:
    """Sleep before the next attempt, or re-raise ``exc`` when it is final or not retryable."""
    delay = retry_delay_s(exc, attempt, policy)
    if delay is None or attempt + 1 >= policy.attempts:
        raise exc
    log.info("%s: %s (%s); retrying in %.1f s", what, exc.code().name, exc.details(), delay)
    time.sleep(delay)


def _with_retries(policy: RetryPolicy, call: Callable, what: str):
    for attempt in range(policy.attempts):
        try:
            return call()
        except grpc.RpcError as exc:
            _pause_or_raise(exc, attempt, policy, what)
    raise AssertionError("unreachable")


def _stream_with_retries(policy: RetryPolicy, call: Callable, what: str) -> Iterator[pb.JobEvent]:
    """Events of a job stream; on a retryable error the call is made again (it joins the open job
    or submits it anew) and results already yielded are not yielded again."""
    seen: set[int] = set()
    for attempt in range(policy.attempts):
        try:
            for event in call():
                if event.WhichOneof("event") == "result":
                    if event.result.query_index in seen:
                        continue
                    seen.add(event.result.query_index)
                yield event
            return
        except grpc.RpcError as exc:
            _pause_or_raise(exc, attempt, policy, what)


def file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


class ResumeState:
    """sha256 -> upload id of unfinished uploads, in a small JSON file (written atomically)."""

    def __init__(self, path: str | os.PathLike = DEFAULT_STATE) -> None:
        self.path = Path(path).expanduser()

    def load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def remember(self, sha256: str, upload_id: str | None) -> None:
        state = self.load()
        if upload_id:
            state[sha256] = upload_id
        else:
            state.pop(sha256, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)


def upload_messages(
    path: Path, header: pb.UploadHeader, offset: int, progress: Progress | None, size: int
) -> Iterator[pb.UploadVideoRequest]:
    yield pb.UploadVideoRequest(header=header)
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(CHUNK_BYTES):
            yield pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=offset, data=block))
            offset += len(block)
            if progress:
                progress(offset, size)


def search_options(mode: str = "", *, min_event_s: float = 0.0, max_rounds: int = 0, max_passes: int = 0,
                   max_visual_tokens: int = 0) -> pb.SearchOptions:
    """SearchOptions from plain values ("off" / "auto" / "" for the server's default; 0 = default)."""
    modes = {"": pb.SearchOptions.MODE_UNSPECIFIED, "off": pb.SearchOptions.OFF, "auto": pb.SearchOptions.AUTO}
    if mode not in modes:
        raise ValueError(f"search mode {mode!r}: expected off or auto")
    options = pb.SearchOptions(mode=modes[mode], max_rounds=max_rounds, max_passes=max_passes,
                               max_visual_tokens=max_visual_tokens)
    if min_event_s:
        options.min_event.FromMilliseconds(round(min_event_s * 1000))
    return options


def localize_request(
    video_id: str, queries: Sequence[str], sampling: SamplingRequest | None, max_new_tokens: int,
    min_confidence: float = 0.0, search: pb.SearchOptions | None = None,
) -> pb.LocalizeRequest:
    return pb.LocalizeRequest(
        video_id=video_id,
        queries=list(queries),
        sampling=(sampling or SamplingRequest()).to_pb(),
        max_new_tokens=max_new_tokens,
        min_confidence=min_confidence,
        search=search,
    )


def channel_options() -> list[tuple[str, int | str]]:
    """Large answers; calls spread round-robin over every address a target names (``ipv4:a,b`` or a
    DNS name with several), so one front end going away leaves the others answering."""
    return [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.lb_policy_name", "round_robin")]


def _metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def _credentials(root_ca: bytes | None, cert: bytes | None, key: bytes | None):
    return grpc.ssl_channel_credentials(root_ca, key, cert)


class MomentsClient:
    """Blocking client."""

    def __init__(self, target: str, *, api_key: str | None = None, tls_root_ca: bytes | None = None,
                 tls_cert: bytes | None = None, tls_key: bytes | None = None,
                 state_path: str | os.PathLike | None = None, retry: RetryPolicy = RetryPolicy()) -> None:
        self.retry = retry
        if tls_root_ca is not None:
            self.channel = grpc.secure_channel(target, _credentials(tls_root_ca, tls_cert, tls_key),
                                               options=channel_options())
        else:
            self.channel = grpc.insecure_channel(target, options=channel_options())
        self.stub = pb_grpc.MomentsStub(self.channel)
        self.metadata = _metadata(api_key)
        self.resume = ResumeState(state_path or DEFAULT_STATE)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "MomentsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, path: str | Path, *, progress: Progress | None = None, max_attempts: int = 5,
               timeout_s: float | None = None) -> pb.UploadVideoResponse:
        """Upload a file, resuming an earlier interrupted upload of the same bytes."""
        path = Path(path)
        sha256, size = file_digest(path)
        error: grpc.RpcError | None = None
        for attempt in range(max_attempts):
            upload_id = self.resume.load().get(sha256, "")
            offset = 0
            if upload_id:
                try:
                    offset = self.stub.GetUpload(pb.GetUploadRequest(upload_id=upload_id),
                                                 metadata=self.metadata).committed_bytes
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    upload_id = ""
                    self.resume.remember(sha256, None)
            header = pb.UploadHeader(size_bytes=size, sha256=sha256, filename=path.name,
                                     content_type="video/*", upload_id=upload_id)
            try:
                response, call = self.stub.UploadVideo.with_call(
                    upload_messages(path, header, offset, progress, size),
                    metadata=self.metadata, timeout=timeout_s,
                )
                self.resume.remember(sha256, None)
                return response
            except grpc.RpcError as exc:
                error = exc
                remembered = _upload_id_from(exc)
                if remembered:
                    self.resume.remember(sha256, remembered)
                delay = retry_delay_s(exc, attempt, self.retry)
                if exc.code() not in RETRYABLE and delay is None:
                    raise
                if delay is None and _retry_info_s(exc) is not None:  # UPLOAD_BUSY: the lock's time left
                    delay = min(self.retry.max_delay_s, _retry_info_s(exc))
                log.warning("upload interrupted (%s); resuming", exc.code().name)
                # e.g. the server is still closing a cut stream, or its disk is full (RetryInfo)
                time.sleep(delay if delay is not None else min(0.2 * 2**attempt, 5.0))
        assert error is not None
        raise error

    def ingest(self, source_uri: str, *, sha256: str = "", size_bytes: int = 0, filename: str = "",
               timeout_s: float | None = None) -> pb.UploadVideoResponse:
        """Have the server fetch a video from ``source_uri`` (s3:// or https://) and store it."""
        request = pb.IngestVideoRequest(source_uri=source_uri, sha256=sha256, size_bytes=size_bytes,
                                        filename=filename)
        return self.stub.IngestVideo(request, metadata=self.metadata, timeout=timeout_s)

    def localize(self, video_id: str, queries: Sequence[str], *, sampling: SamplingRequest | None = None,
                 max_new_tokens: int = 0, min_confidence: float = 0.0, search: pb.SearchOptions | None = None,
                 timeout_s: float | None = None) -> pb.LocalizeResponse:
        """``min_confidence`` 0 = the server's default; ``search``: see :func:`search_options`."""
        request = localize_request(video_id, queries, sampling, max_new_tokens, min_confidence, search)
        return _with_retries(self.retry, lambda: self.stub.Localize(request, metadata=self.metadata,
                                                                    timeout=timeout_s), "Localize")

    def stream_localize(self, video_id: str, queries: Sequence[str], *,
                        sampling: SamplingRequest | None = None, max_new_tokens: int = 0,
                        min_confidence: float = 0.0, search: pb.SearchOptions | None = None,
                        timeout_s: float | None = None) -> Iterable[pb.JobEvent]:
        request = localize_request(video_id, queries, sampling, max_new_tokens, min_confidence, search)
        return _stream_with_retries(
            self.retry, lambda: self.stub.StreamLocalize(request, metadata=self.metadata, timeout=timeout_s),
            "StreamLocalize")

    def search_videos(self, queries: Sequence[str], *, video_ids: Sequence[str] = (), all_of_mine: bool = False,
                      limit: int = 10, min_confidence: float = 0.0, sampling: SamplingRequest | None = None,
                      max_new_tokens: int = 0, search: pb.SearchOptions | None = None,
                      timeout_s: float | None = None):
        """SearchVideos over ``video_ids`` (or every video of the caller): the stream of
        SearchVideosEvent, whose ``cancel()`` stops the search. Not retried (a retry would ask every
        video again)."""
        request = pb.SearchVideosRequest(
            queries=list(queries), video_ids=list(video_ids), all_of_mine=all_of_mine, limit=limit,
            min_confidence=min_confidence, sampling=(sampling or SamplingRequest()).to_pb(),
            max_new_tokens=max_new_tokens, search=search)
        return self.stub.SearchVideos(request, metadata=self.metadata, timeout=timeout_s)

    def index(self, video_id: str, *, sampling: SamplingRequest | None = None,
              timeout_s: float | None = None) -> Iterable[pb.JobEvent]:
        request = pb.IndexVideoRequest(video_id=video_id, sampling=(sampling or SamplingRequest()).to_pb())
        return _stream_with_retries(
            self.retry, lambda: self.stub.IndexVideo(request, metadata=self.metadata, timeout=timeout_s),
            "IndexVideo")

    def get_video(self, video_id: str) -> pb.Video:
        return _with_retries(self.retry, lambda: self.stub.GetVideo(pb.GetVideoRequest(video_id=video_id),
                                                                    metadata=self.metadata), "GetVideo")

    def list_videos(self) -> Iterator[pb.Video]:
        token = ""
        while True:
            page = self.stub.ListVideos(pb.ListVideosRequest(page_size=100, page_token=token),
                                        metadata=self.metadata)
            yield from page.videos
            token = page.next_page_token
            if not token:
                return

    def delete_video(self, video_id: str) -> pb.DeleteVideoResponse:
        """Deleting twice is harmless (the second finds nothing), so it is retried like the others."""
        return _with_retries(self.retry, lambda: self.stub.DeleteVideo(pb.DeleteVideoRequest(video_id=video_id),
                                                                       metadata=self.metadata), "DeleteVideo")


class AsyncMomentsClient:
    """asyncio client (``grpc.aio``)."""

    def __init__(self, target: str, *, api_key: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=channel_options())
        self.stub = pb_grpc.MomentsStub(self.channel)
        self.metadata = _metadata(api_key)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncMomentsClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def upload_bytes(self, data: bytes, filename: str = "video.mp4",
                           timeout_s: float | None = None) -> pb.UploadVideoResponse:
        sha256 = hashlib.sha256(data).hexdigest()

        async def messages() -> AsyncIterator[pb.UploadVideoRequest]:
            yield pb.UploadVideoRequest(header=pb.UploadHeader(
                size_bytes=len(data), sha256=sha256, filename=filename, content_type="video/*"))
            for offset in range(0, len(data), CHUNK_BYTES):
                yield pb.UploadVideoRequest(
                    chunk=pb.UploadChunk(offset=offset, data=data[offset: offset + CHUNK_BYTES]))

        return await self.stub.UploadVideo(messages(), metadata=self.metadata, timeout=timeout_s)

    async def localize(self, video_id: str, queries: Sequence[str], *,
                       sampling: SamplingRequest | None = None, max_new_tokens: int = 0,
                       min_confidence: float = 0.0, search: pb.SearchOptions | None = None,
                       timeout_s: float | None = None) -> pb.LocalizeResponse:
        request = localize_request(video_id, queries, sampling, max_new_tokens, min_confidence, search)
        return await self.stub.Localize(request, metadata=self.metadata, timeout=timeout_s)

    def stream_localize(self, video_id: str, queries: Sequence[str], *,
                        sampling: SamplingRequest | None = None, max_new_tokens: int = 0,
                        min_confidence: float = 0.0, search: pb.SearchOptions | None = None,
                        timeout_s: float | None = None):
        request = localize_request(video_id, queries, sampling, max_new_tokens, min_confidence, search)
        return self.stub.StreamLocalize(request, metadata=self.metadata, timeout=timeout_s)

    async def get_video(self, video_id: str) -> pb.Video:
        return await self.stub.GetVideo(pb.GetVideoRequest(video_id=video_id), metadata=self.metadata)

    async def delete_video(self, video_id: str) -> pb.DeleteVideoResponse:
        return await self.stub.DeleteVideo(pb.DeleteVideoRequest(video_id=video_id), metadata=self.metadata)


def _rich_details(exc: grpc.RpcError) -> list:
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(exc)
    except Exception:  # noqa: BLE001 - not a rich status
        return []
    return list(status.details) if status is not None else []


def _retry_info_s(exc: grpc.RpcError) -> float | None:
    from google.rpc import error_details_pb2

    for detail in _rich_details(exc):
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000
    return None


def _upload_id_from(exc: grpc.RpcError) -> str:
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    try:
        status = rpc_status.from_call(exc)
    except Exception:  # noqa: BLE001 - not a rich status
        return ""
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            return info.metadata.get("upload_id", "")
    return ""
