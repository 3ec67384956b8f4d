"""Domain errors. Handlers and workers raise these; one interceptor maps them to gRPC status codes."""

from __future__ import annotations


class MomentsError(Exception):
    """Base class. ``field`` names the request field at fault, when there is one."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(MomentsError):
    """The caller sent something wrong (INVALID_ARGUMENT + BadRequest)."""


class InvalidVideo(InvalidArgument):
    """The file is not a video we can use: no video stream, hostile, undecodable, over limits."""

    def __init__(self, message: str, *, field: str = "data") -> None:
        super().__init__(message, field=field)


class NotFound(MomentsError):
    """The video, upload or job does not exist for this caller (NOT_FOUND)."""


class FailedPrecondition(MomentsError):
    """E.g. a chunk at the wrong offset (FAILED_PRECONDITION); ``committed_bytes`` says where to resume.

    ``reason`` (an ErrorInfo reason such as SOURCE_UNAVAILABLE) with ``metadata`` names other causes."""

    def __init__(self, message: str, *, committed_bytes: int | None = None, upload_id: str = "",
                 reason: str = "", metadata: dict[str, str] | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """Set when waiting fixes it (UPLOAD_BUSY: until the other stream's lock lapses): a RetryInfo."""
        self.committed_bytes = committed_bytes
        self.upload_id = upload_id
        self.reason = reason
        self.metadata = metadata or {}


class ResourceExhausted(MomentsError):
    """Queue full, quota, disk full (RESOURCE_EXHAUSTED + RetryInfo)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, quota: str = "") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.quota = quota
        """The tenant cap that was hit (a QuotaFailure subject), when one was."""


class Unavailable(MomentsError):
    """Redis or workers are down (UNAVAILABLE)."""


class Unauthenticated(MomentsError):
    """Missing or wrong API key (UNAUTHENTICATED)."""


class DeadlineExceeded(MomentsError):
    """The call's deadline passed before the result was ready."""


class JobFailed(MomentsError):
    """The job failed on the worker side (model error, retries exhausted); ABORTED + ErrorInfo JOB_FAILED."""

    def __init__(self, message: str, *, job_id: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id


class JobLost(MomentsError):
    """The job's record vanished from Redis (a failover dropped the last writes, or a restart without
    it): ABORTED + ErrorInfo JOB_LOST + RetryInfo; calling again submits it anew."""

    def __init__(self, message: str, *, job_id: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.retry_after_s = retry_after_s


class Internal(MomentsError):
    """A mismatch inside Moments (a bug): never the caller's fault (INTERNAL, retried like a model error)."""


class FatalDeviceError(Exception):
    """The accelerator is unusable (e.g. CUDA error): the worker must leave the group and exit."""
