"""One interceptor for every Moments RPC: API-key auth and quotas, domain error -> status, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from moments.core import errors
from moments.service import metrics
from moments.service.auth import Authenticator, current_tenant
from moments.service.status import to_status

log = logging.getLogger(__name__)
SERVICE_PREFIX = "/moments.v1.Moments/"


class _Malformed:
    """A request message that does not parse (bad wire format, non-UTF-8 string)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserialize):
    """Single requests that fail to parse reach the wrapper (INVALID_ARGUMENT), not gRPC (UNKNOWN)."""
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return parse if deserialize else None


def _domain(exc: Exception) -> errors.MomentsError:
    if isinstance(exc, DecodeError):  # a streamed message that does not parse
        return errors.InvalidArgument(f"malformed request message: {exc}")
    return exc


def _parsed(request):
    if isinstance(request, _Malformed):
        raise errors.InvalidArgument(f"malformed request message: {request.reason}")
    return request


class MomentsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps handlers of the Moments service; health and reflection pass through untouched."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        name = method[len(SERVICE_PREFIX):]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, handler.unary_unary),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(name, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(name, handler.unary_stream),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    @contextlib.asynccontextmanager
    async def _scope(self, name: str, context):
        """Auth and quotas on entry; on exit, the one mapping of exceptions to statuses, and metrics."""
        start = time.perf_counter()
        code = "OK"
        key = slot = None
        try:
            metadata = {k: v for k, v in (context.invocation_metadata() or ())}
            key = await self.auth.identify(metadata, context.peer() or "")
            current_tenant.set(key.tenant)
            slot = await self.auth.acquire(key)
            yield
        except (asyncio.CancelledError, grpc.aio.AbortError):
            code = "CANCELLED"
            raise
        except (errors.MomentsError, DecodeError) as exc:
            exc = _domain(exc)
            code = type(exc).__name__
            await context.abort_with_status(to_status(exc))
        except RedisError as exc:
            code = "Unavailable"
            await context.abort_with_status(to_status(errors.Unavailable(f"Redis is unreachable: {exc}")))
        except Exception as exc:  # noqa: BLE001 - the one place unknown errors become INTERNAL
            code = "INTERNAL"
            await context.abort_with_status(to_status(exc))
        finally:
            if slot:
                await self._release(key)
            metrics.REQUESTS.labels(name, code).inc()
            metrics.LATENCY.labels(name).observe(time.perf_counter() - start)

    def _unary(self, name, behavior):
        async def wrapper(request, context):
            async with self._scope(name, context):
                return await behavior(_parsed(request), context)

        return wrapper

    def _streaming(self, name, behavior):
        async def wrapper(request, context):
            async with self._scope(name, context):
                async with contextlib.aclosing(behavior(_parsed(request), context)) as items:
                    async for item in items:
                        yield item

        return wrapper

    async def _release(self, key) -> None:
        try:
            await self.auth.release(key)
        except Exception:  # noqa: BLE001 - Redis may be down; the counter expires
            log.warning("could not release concurrency slot of %s", key.tenant)
