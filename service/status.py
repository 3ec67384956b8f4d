"""The one mapping from domain errors to gRPC status codes with ``google.rpc`` details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from moments.core import errors

log = logging.getLogger(__name__)
DOMAIN = "moments.v1"
"""ErrorInfo.domain of every reason below; the reasons and their metadata keys are documented on
``service Moments`` in protos/moments/v1/moments.proto."""


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(seconds * 1000))
    return delay


def to_status(exc: BaseException) -> grpc.Status:
    """Build the rich status for a domain error; anything unknown becomes INTERNAL."""
    details: list[any_pb2.Any] = []
    if isinstance(exc, errors.InvalidArgument):
        code = code_pb2.INVALID_ARGUMENT
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.message
        )
        details.append(_any(error_details_pb2.BadRequest(field_violations=[violation])))
    elif isinstance(exc, errors.NotFound):
        code = code_pb2.NOT_FOUND
    elif isinstance(exc, errors.FailedPrecondition):
        code = code_pb2.FAILED_PRECONDITION
        if exc.reason:
            details.append(_any(error_details_pb2.ErrorInfo(reason=exc.reason, domain="moments.v1",
                                                            metadata=exc.metadata)))
        elif exc.committed_bytes is not None or exc.upload_id:
            # WRONG_OFFSET: resume at committed_bytes. UPLOAD_BUSY: another stream holds the
            # upload (e.g. the server is still closing a cut one); retry after a short wait.
            metadata = {"upload_id": exc.upload_id}
            if exc.committed_bytes is not None:
                metadata["committed_bytes"] = str(exc.committed_bytes)
            reason = "WRONG_OFFSET" if exc.committed_bytes is not None else "UPLOAD_BUSY"
            details.append(_any(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)))
        if exc.retry_after_s is not None:
            details.append(_any(error_details_pb2.RetryInfo(retry_delay=_duration(exc.retry_after_s))))
    elif isinstance(exc, errors.ResourceExhausted):
        code = code_pb2.RESOURCE_EXHAUSTED
        details.append(_any(error_details_pb2.RetryInfo(retry_delay=_duration(exc.retry_after_s))))
        if exc.quota:
            violation = error_details_pb2.QuotaFailure.Violation(subject=exc.quota, description=exc.message)
            details.append(_any(error_details_pb2.QuotaFailure(violations=[violation])))
    elif isinstance(exc, errors.Unavailable):
        code = code_pb2.UNAVAILABLE
    elif isinstance(exc, errors.Unauthenticated):
        code = code_pb2.UNAUTHENTICATED
    elif isinstance(exc, errors.DeadlineExceeded):
        code = code_pb2.DEADLINE_EXCEEDED
    elif isinstance(exc, errors.JobLost):
        code = code_pb2.ABORTED
        details.append(_any(error_details_pb2.ErrorInfo(reason="JOB_LOST", domain=DOMAIN,
                                                        metadata={"job_id": exc.job_id})))
        details.append(_any(error_details_pb2.RetryInfo(retry_delay=_duration(exc.retry_after_s))))
    elif isinstance(exc, errors.JobFailed):
        code = code_pb2.ABORTED
        details.append(_any(error_details_pb2.ErrorInfo(reason="JOB_FAILED", domain=DOMAIN,
                                                        metadata={"job_id": exc.job_id})))
    else:
        log.exception("internal error", exc_info=exc)
        code = code_pb2.INTERNAL
        return rpc_status.to_status(status_pb2.Status(code=code, message="internal error"))
    message = exc.message if isinstance(exc, errors.MomentsError) else str(exc)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))
