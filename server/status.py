"""The one table from domain errors to gRPC status codes, and the wrappers applying it."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError

from moduleserve.registry import errors as registry_errors
from moduleserve.registry import introspect
from moduleserve.server import errors as server_errors

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
    server_errors.QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    server_errors.MemoryBudgetFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    server_errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    server_errors.ModelLoadingError: grpc.StatusCode.UNAVAILABLE,
    server_errors.CheckpointMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    server_errors.ModelClassNotAllowedError: grpc.StatusCode.PERMISSION_DENIED,
    server_errors.ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    server_errors.ModelOutputError: grpc.StatusCode.FAILED_PRECONDITION,
    server_errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    server_errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    introspect.TensorNotFoundError: grpc.StatusCode.NOT_FOUND,
    introspect.TensorNotMaterializedError: grpc.StatusCode.FAILED_PRECONDITION,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = Any
UnaryMethod = Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[Response]]
StreamMethod = Callable[[Servicer, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only

# Details travel percent-encoded in a trailer, and clients drop trailers past 8 KiB: a longer
# sentence would reach them as RESOURCE_EXHAUSTED "Stream removed" instead of itself.
MAX_DETAILS_BYTES = 1024


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status a domain error maps to, or None for an unexpected exception."""
    for cls in type(exc).__mro__:
        code = STATUS_FOR.get(cls)
        if code is not None:
            return code
    return None


def status_of(
    exc: BaseException, context: grpc.aio.ServicerContext, method: str
) -> tuple[grpc.StatusCode, str]:
    """The status and sentence an exception becomes; unexpected errors stay in the log."""
    code = status_for(exc)
    if code is None:
        request_id = _request_id(context)
        logger.error("internal error in %s (request id %s)", method, request_id, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
    details = fit_details(str(exc))
    logger.info("%s -> %s: %s", method, code.name, details)
    return code, details


def fit_details(details: str) -> str:
    """Cut a sentence to what a client's metadata limit lets through, marking the cut."""
    data = details.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return details
    return data[: MAX_DETAILS_BYTES - 3].decode(errors="ignore") + "…"


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
            code, details = status_of(exc, context, func.__name__)
            # The exception may outlive this call (a failed load shares one with all its
            # waiters, in a reference cycle): it must not keep this call's frames alive.
            exc.__traceback__ = None
        # Abort only once the except block is left: raised inside it, the abort would chain
        # `exc`, whose frames hold the request. gRPC keeps the abort's traceback in a cycle
        # with the context, so this frame must not hold the request either: otherwise up to
        # max_message_mb per refused call stays in memory until a full GC.
        del request
        await context.abort(code, details)
        raise AssertionError("context.abort returned")

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
            return
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, details = status_of(exc, context, func.__name__)
            exc.__traceback__ = None  # as in map_errors
        del request  # as in map_errors
        await context.abort(code, details)  # outside the except block, as in map_errors

    return wrapper


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bytes become INVALID_ARGUMENT with a sentence, on every service.

    gRPC decodes a request before any handler runs, and answers a decoder error with
    UNKNOWN and the decoder's own text; so each handler gets a deserializer that never
    raises, and a handler that refuses what it could not decode.
    """

    def __init__(self) -> None:
        # method path -> (the handler found, its guarded twin): built once per handler.
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        found = self._guarded.get(method)
        if found is None or found[0] is not handler:
            found = self._guarded[method] = (handler, guard_decoding(handler, method))
        guarded: Handler = found[1]
        return guarded


_UNDECODABLE = object()


def guard_decoding(handler: Any, method: str) -> Any:
    """`handler` (a grpc RpcMethodHandler tuple) refusing undecodable requests by a sentence."""
    sentence = (
        f"the {method.rsplit('/', 1)[-1]} request could not be decoded: it is not a valid "
        "protobuf message of that method's request type"
    )
    decode = handler.request_deserializer
    if decode is None:  # the handler takes raw bytes: nothing can fail to decode
        return handler
    if handler.request_streaming:
        # Streamed messages are decoded inside the handler, so its error mapping applies.
        def decode_or_refuse(data: bytes) -> Any:
            try:
                return decode(data)
            except DecodeError:
                raise registry_errors.InvalidInputError(sentence) from None

        return handler._replace(request_deserializer=decode_or_refuse)

    def decode_or_mark(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError:
            return _UNDECODABLE

    field = "unary_stream" if handler.response_streaming else "unary_unary"
    behavior = _refusing(getattr(handler, field), sentence)
    if behavior is None:  # a sync handler: this asyncio server has none
        return handler
    return handler._replace(request_deserializer=decode_or_mark, **{field: behavior})


def _refusing(behavior: Any, sentence: str) -> Any:
    """`behavior` of the same kind (gRPC tells them apart), first refusing _UNDECODABLE."""
    if inspect.isasyncgenfunction(behavior):

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is _UNDECODABLE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, sentence)
            items = behavior(request, context)
            del request  # see refuse
            async for item in items:
                yield item

        return refuse_stream
    if inspect.iscoroutinefunction(behavior):

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is _UNDECODABLE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, sentence)
            pending = behavior(request, context)
            # An abort in `behavior` passes this frame, which must then not hold the request
            # (see map_errors).
            del request
            return await pending

        return refuse
    return None


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value:
            return value[:64]
    return uuid.uuid4().hex[:16]
