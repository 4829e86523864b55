"""The one table from domain errors to gRPC status codes, and the wrappers applying it."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from registry import errors as registry_errors
from registry import introspect
from server import errors as server_errors

logger = logging.getLogger(__name__)

# Looked up along the exception's MRO: the most specific class listed wins.
STATUS_FOR: dict[type[BaseException], grpc.StatusCode] = {
    registry_errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    registry_errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    registry_errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    registry_errors.AliasConflictError: grpc.StatusCode.ABORTED,
    registry_errors.WriteConflictError: grpc.StatusCode.ABORTED,
    registry_errors.ConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    registry_errors.StateDictMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    registry_errors.SchemaOutdatedError: grpc.StatusCode.FAILED_PRECONDITION,
    registry_errors.ClassNotAllowedError: grpc.StatusCode.PERMISSION_DENIED,
    registry_errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    registry_errors.RegistryUnavailableError: grpc.StatusCode.UNAVAILABLE,
    server_errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    server_errors.QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    server_errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    server_errors.ModelLoadingError: grpc.StatusCode.UNAVAILABLE,
    server_errors.ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    server_errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    server_errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    introspect.TensorNotFoundError: grpc.StatusCode.NOT_FOUND,
    introspect.InvalidPatternError: grpc.StatusCode.INVALID_ARGUMENT,
    introspect.InvalidSliceError: grpc.StatusCode.INVALID_ARGUMENT,
    introspect.TooLargeError: grpc.StatusCode.INVALID_ARGUMENT,
    introspect.TensorNotMaterializedError: grpc.StatusCode.FAILED_PRECONDITION,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = Any
UnaryMethod = Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[Response]]
StreamMethod = Callable[[Servicer, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status a domain error maps to, or None for an unexpected exception."""
    for cls in type(exc).__mro__:
        code = STATUS_FOR.get(cls)
        if code is not None:
            return code
    return None


async def abort_with(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """End the RPC with the mapped status and a sentence; unexpected errors stay in the log."""
    code = status_for(exc)
    if code is None:
        request_id = _request_id(context)
        logger.exception("internal error in %s (request id %s)", method, request_id)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
    logger.info("%s -> %s: %s", method, code.name, exc)
    await context.abort(code, str(exc))


def map_errors(func: UnaryMethod[Request, Response]) -> UnaryMethod[Request, Response]:
    """Decorate a unary RPC method so every exception becomes a gRPC status."""

    @functools.wraps(func)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext
    ) -> Response:
        try:
            return await func(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, context, func.__name__)
            raise AssertionError("context.abort returned") from exc

    return wrapper


def map_stream_errors(func: StreamMethod[Request, Response]) -> StreamMethod[Request, Response]:
    """Decorate a server-streaming RPC method so every exception becomes a gRPC status."""

    @functools.wraps(func)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        try:
            async for item in func(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, context, func.__name__)

    return wrapper


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value:
            return value[:64]
    return uuid.uuid4().hex[:16]
