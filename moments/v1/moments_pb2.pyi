import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_OUTCOME_UNSPECIFIED: _ClassVar[CacheOutcome]
    CACHE_MISS: _ClassVar[CacheOutcome]
    CACHE_HIT_TOKENS: _ClassVar[CacheOutcome]
    CACHE_HIT_KV: _ClassVar[CacheOutcome]
    CACHE_BYPASSED: _ClassVar[CacheOutcome]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    QUEUED: _ClassVar[Stage]
    DECODING: _ClassVar[Stage]
    ENCODING: _ClassVar[Stage]
    PREFILLING: _ClassVar[Stage]
    GENERATING: _ClassVar[Stage]
    DONE: _ClassVar[Stage]
    SEARCHING: _ClassVar[Stage]
CACHE_OUTCOME_UNSPECIFIED: CacheOutcome
CACHE_MISS: CacheOutcome
CACHE_HIT_TOKENS: CacheOutcome
CACHE_HIT_KV: CacheOutcome
CACHE_BYPASSED: CacheOutcome
STAGE_UNSPECIFIED: Stage
QUEUED: Stage
DECODING: Stage
ENCODING: Stage
PREFILLING: Stage
GENERATING: Stage
DONE: Stage
SEARCHING: Stage

class UploadHeader(_message.Message):
    __slots__ = ("size_bytes", "sha256", "filename", "content_type", "upload_id")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    sha256: str
    filename: str
    content_type: str
    upload_id: str
    def __init__(self, size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., upload_id: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadVideoRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: UploadChunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[UploadChunk, _Mapping]] = ...) -> None: ...

class UploadVideoResponse(_message.Message):
    __slots__ = ("video", "deduplicated", "upload_id")
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    video: Video
    deduplicated: bool
    upload_id: str
    def __init__(self, video: _Optional[_Union[Video, _Mapping]] = ..., deduplicated: _Optional[bool] = ..., upload_id: _Optional[str] = ...) -> None: ...

class IngestVideoRequest(_message.Message):
    __slots__ = ("source_uri", "sha256", "size_bytes", "filename")
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    source_uri: str
    sha256: str
    size_bytes: int
    filename: str
    def __init__(self, source_uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., filename: _Optional[str] = ...) -> None: ...

class GetUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class Upload(_message.Message):
    __slots__ = ("upload_id", "committed_bytes", "size_bytes", "sha256", "expire_time")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    committed_bytes: int
    size_bytes: int
    sha256: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, upload_id: _Optional[str] = ..., committed_bytes: _Optional[int] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("video_id", "filename", "size_bytes", "duration", "native_fps", "variable_frame_rate", "width", "height", "codec", "container", "rotation_degrees", "frame_count", "create_time", "content_type")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    NATIVE_FPS_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_FRAME_RATE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    ROTATION_DEGREES_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    filename: str
    size_bytes: int
    duration: _duration_pb2.Duration
    native_fps: float
    variable_frame_rate: bool
    width: int
    height: int
    codec: str
    container: str
    rotation_degrees: int
    frame_count: int
    create_time: _timestamp_pb2.Timestamp
    content_type: str
    def __init__(self, video_id: _Optional[str] = ..., filename: _Optional[str] = ..., size_bytes: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., native_fps: _Optional[float] = ..., variable_frame_rate: _Optional[bool] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., codec: _Optional[str] = ..., container: _Optional[str] = ..., rotation_degrees: _Optional[int] = ..., frame_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., content_type: _Optional[str] = ...) -> None: ...

class GetVideoRequest(_message.Message):
    __slots__ = ("video_id",)
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    def __init__(self, video_id: _Optional[str] = ...) -> None: ...

class ListVideosRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVideosResponse(_message.Message):
    __slots__ = ("videos", "next_page_token")
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    videos: _containers.RepeatedCompositeFieldContainer[Video]
    next_page_token: str
    def __init__(self, videos: _Optional[_Iterable[_Union[Video, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteVideoRequest(_message.Message):
    __slots__ = ("video_id",)
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    def __init__(self, video_id: _Optional[str] = ...) -> None: ...

class DeleteVideoResponse(_message.Message):
    __slots__ = ("cache_entries_removed",)
    CACHE_ENTRIES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    cache_entries_removed: int
    def __init__(self, cache_entries_removed: _Optional[int] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("max_fps", "max_frames", "budget_tokens", "start_offset", "end_offset")
    MAX_FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    max_fps: float
    max_frames: int
    budget_tokens: int
    start_offset: _duration_pb2.Duration
    end_offset: _duration_pb2.Duration
    def __init__(self, max_fps: _Optional[float] = ..., max_frames: _Optional[int] = ..., budget_tokens: _Optional[int] = ..., start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class IndexVideoRequest(_message.Message):
    __slots__ = ("video_id", "sampling", "callback_url")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    sampling: SamplingOptions
    callback_url: str
    def __init__(self, video_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., callback_url: _Optional[str] = ...) -> None: ...

class SearchOptions(_message.Message):
    __slots__ = ("mode", "min_event", "max_rounds", "max_passes", "max_visual_tokens")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[SearchOptions.Mode]
        OFF: _ClassVar[SearchOptions.Mode]
        AUTO: _ClassVar[SearchOptions.Mode]
    MODE_UNSPECIFIED: SearchOptions.Mode
    OFF: SearchOptions.Mode
    AUTO: SearchOptions.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_EVENT_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    mode: SearchOptions.Mode
    min_event: _duration_pb2.Duration
    max_rounds: int
    max_passes: int
    max_visual_tokens: int
    def __init__(self, mode: _Optional[_Union[SearchOptions.Mode, str]] = ..., min_event: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_rounds: _Optional[int] = ..., max_passes: _Optional[int] = ..., max_visual_tokens: _Optional[int] = ...) -> None: ...

class LocalizeRequest(_message.Message):
    __slots__ = ("video_id", "queries", "sampling", "max_new_tokens", "min_confidence", "search", "callback_url")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    queries: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingOptions
    max_new_tokens: int
    min_confidence: float
    search: SearchOptions
    callback_url: str
    def __init__(self, video_id: _Optional[str] = ..., queries: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., min_confidence: _Optional[float] = ..., search: _Optional[_Union[SearchOptions, _Mapping]] = ..., callback_url: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("start_offset", "end_offset", "confidence")
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    start_offset: _duration_pb2.Duration
    end_offset: _duration_pb2.Duration
    confidence: float
    def __init__(self, start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., confidence: _Optional[float] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("query_index", "query", "segments", "raw_answer", "found", "score")
    QUERY_INDEX_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    RAW_ANSWER_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    query_index: int
    query: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    raw_answer: str
    found: bool
    score: float
    def __init__(self, query_index: _Optional[int] = ..., query: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., raw_answer: _Optional[str] = ..., found: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class JobStats(_message.Message):
    __slots__ = ("sampled_fps", "frames", "visual_tokens", "frame_width", "frame_height", "cache", "stage_ms", "worker", "model", "attempt", "effective_sampling", "rounds", "passes", "total_visual_tokens", "weights")
    class StageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SAMPLED_FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRAME_WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAME_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    sampled_fps: float
    frames: int
    visual_tokens: int
    frame_width: int
    frame_height: int
    cache: CacheOutcome
    stage_ms: _containers.ScalarMap[str, float]
    worker: str
    model: str
    attempt: int
    effective_sampling: SamplingOptions
    rounds: int
    passes: int
    total_visual_tokens: int
    weights: str
    def __init__(self, sampled_fps: _Optional[float] = ..., frames: _Optional[int] = ..., visual_tokens: _Optional[int] = ..., frame_width: _Optional[int] = ..., frame_height: _Optional[int] = ..., cache: _Optional[_Union[CacheOutcome, str]] = ..., stage_ms: _Optional[_Mapping[str, float]] = ..., worker: _Optional[str] = ..., model: _Optional[str] = ..., attempt: _Optional[int] = ..., effective_sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., rounds: _Optional[int] = ..., passes: _Optional[int] = ..., total_visual_tokens: _Optional[int] = ..., weights: _Optional[str] = ...) -> None: ...

class LocalizeResponse(_message.Message):
    __slots__ = ("job_id", "results", "stats")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    stats: JobStats
    def __init__(self, job_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ..., stats: _Optional[_Union[JobStats, _Mapping]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "progress", "result", "done")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    progress: Progress
    result: QueryResult
    done: JobStats
    def __init__(self, job_id: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[QueryResult, _Mapping]] = ..., done: _Optional[_Union[JobStats, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "message", "round")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    done: int
    total: int
    message: str
    round: int
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class SearchVideosRequest(_message.Message):
    __slots__ = ("queries", "video_ids", "all_of_mine", "min_confidence", "limit", "sampling", "max_new_tokens", "search")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    VIDEO_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_OF_MINE_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedScalarFieldContainer[str]
    video_ids: _containers.RepeatedScalarFieldContainer[str]
    all_of_mine: bool
    min_confidence: float
    limit: int
    sampling: SamplingOptions
    max_new_tokens: int
    search: SearchOptions
    def __init__(self, queries: _Optional[_Iterable[str]] = ..., video_ids: _Optional[_Iterable[str]] = ..., all_of_mine: _Optional[bool] = ..., min_confidence: _Optional[float] = ..., limit: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., search: _Optional[_Union[SearchOptions, _Mapping]] = ...) -> None: ...

class SearchProgress(_message.Message):
    __slots__ = ("videos_done", "videos_total")
    VIDEOS_DONE_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    videos_done: int
    videos_total: int
    def __init__(self, videos_done: _Optional[int] = ..., videos_total: _Optional[int] = ...) -> None: ...

class VideoError(_message.Message):
    __slots__ = ("video_id", "code", "message")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    code: str
    message: str
    def __init__(self, video_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("video_id", "query_index", "query", "segment", "score")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_INDEX_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    query_index: int
    query: str
    segment: Segment
    score: float
    def __init__(self, video_id: _Optional[str] = ..., query_index: _Optional[int] = ..., query: _Optional[str] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class SearchResults(_message.Message):
    __slots__ = ("hits", "videos_answered")
    HITS_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    videos_answered: int
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., videos_answered: _Optional[int] = ...) -> None: ...

class SearchVideosEvent(_message.Message):
    __slots__ = ("progress", "video_error", "results")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    progress: SearchProgress
    video_error: VideoError
    results: SearchResults
    def __init__(self, progress: _Optional[_Union[SearchProgress, _Mapping]] = ..., video_error: _Optional[_Union[VideoError, _Mapping]] = ..., results: _Optional[_Union[SearchResults, _Mapping]] = ...) -> None: ...
