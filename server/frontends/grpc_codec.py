"""gRPC over HTTP/2 as an ASGI application: the wire codec under Envoy (pyvoy).

Envoy speaks HTTP/2; this module speaks gRPC on top of it: length-prefixed messages,
`grpc-timeout` deadlines, metadata from headers, status and message in trailers, and
client cancellation (an `http.disconnect` cancels the handler). It runs the very
`grpc.RpcMethodHandler`s that `Core.add_services` registers, with a context object that
offers what our servicers and grpc's health and reflection servicers use of
`grpc.aio.ServicerContext`, so every service behaves the same under both front ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
import urllib.parse
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from moduleserve.server.status import fit_details, guard_decoding

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_PREFIX = struct.Struct(">?I")  # compressed flag, message length
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Headers that are HTTP/2 or gRPC framing, not metadata an application sent.
# grpc-message is percent-encoded: every printable ASCII byte but '%' travels as itself.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_NOT_METADATA = {"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}


class _Abort(grpc.aio.AbortError):
    """Raised by `abort`: carries the status to the codec. An AbortError, as grpc.aio's,
    so that `map_errors` lets it pass."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _ClientGone(Exception):
    """The client reset the stream or closed the connection while we read its request."""


class HandlerTable:
    """The handlers registered by `Core.add_services`, looked up by method path."""

    def __init__(self) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._found: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self._found[f"/{service}/{name}"] = guard_decoding(handler, f"/{service}/{name}")

    def lookup(self, method: str) -> Any | None:
        """The (decode-guarded) handler of `method`, or None when no service has it."""
        found = self._found.get(method)
        if found is None:
            for generic in self._generic:
                handler = generic.service(_Details(method))
                if handler is not None:
                    found = self._found[method] = guard_decoding(handler, method)
                    break
        return found


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class GrpcContext:
    """The part of `grpc.aio.ServicerContext` our handlers use, over one HTTP/2 stream."""

    def __init__(
        self, headers: list[tuple[bytes, bytes]], deadline: float | None, scope: Scope
    ) -> None:
        self._headers = headers
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self._deadline = deadline
        self._scope = scope
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.writer: Callable[[Any], Awaitable[None]] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self._metadata is None:  # parsed on first use: most calls never look
            self._metadata = _metadata(self._headers)
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return _peer(self._scope)

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> None:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def write(self, message: Any) -> None:
        assert self.writer is not None, "write() on a call that does not stream responses"
        await self.writer(message)

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False


class GrpcCodec:
    """One ASGI `http` call carrying a gRPC request: decode, run the handler, encode."""

    def __init__(self, table: HandlerTable, max_message_bytes: int) -> None:
        self.table = table
        self.max_message_bytes = max_message_bytes
        self.refusing = ""
        """When set (the server is draining), every new call gets UNAVAILABLE with this."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["path"]
        headers = scope["headers"]
        call = _Call(send, receive)
        try:
            if scope.get("http_version") != "2":
                raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "gRPC needs HTTP/2")
            if self.refusing:  # as grpc.aio after stop(): in-flight calls finish, new ones go
                raise _Abort(grpc.StatusCode.UNAVAILABLE, self.refusing)
            handler = self.table.lookup(method)
            if handler is None:
                raise _Abort(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {method}")
            deadline, encoding = _call_headers(headers)
            context = GrpcContext(headers, deadline, scope)
            reader = _Reader(receive, self.max_message_bytes, encoding)
            if deadline is None:  # the common case: no timer to arm
                await self._dispatch(handler, context, reader, call)
            else:
                await self._dispatch_by(deadline, handler, context, reader, call)
        except _Abort as abort:
            await call.finish(abort.code, abort.details)
        except (_ClientGone, OSError):  # nobody listens any more (ASGI servers raise an
            return  # OSError from send() once the client is gone): nothing to send
        except asyncio.CancelledError:
            if call.cancelled_by_client:  # as above, noticed by the call's watch
                return
            raise
        except Exception as exc:  # a bug of ours: the client gets a sentence, the log the rest
            request_id = uuid.uuid4().hex[:16]
            logger.error("internal error in %s (request id %s)", method, request_id, exc_info=exc)
            await call.finish(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
        finally:
            call.done()

    async def _dispatch(
        self, handler: Any, context: GrpcContext, reader: _Reader, call: _Call
    ) -> None:
        if handler.request_streaming or handler.response_streaming:
            await self._stream(handler, context, reader, call)
        else:
            await self._unary(handler, context, reader, call)

    async def _dispatch_by(
        self, deadline: float, handler: Any, context: GrpcContext, reader: _Reader, call: _Call
    ) -> None:
        """`_dispatch`, cancelled with DEADLINE_EXCEEDED when the client's deadline passes."""
        timeout = asyncio.timeout_at(
            asyncio.get_running_loop().time() + (deadline - time.monotonic())
        )
        try:
            async with timeout:
                await self._dispatch(handler, context, reader, call)
        except TimeoutError:
            if not timeout.expired():  # a handler's own TimeoutError: not the deadline
                raise
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    async def _unary(
        self, handler: Any, context: GrpcContext, reader: _Reader, call: _Call
    ) -> None:
        """The hot path (every inference call): one message in, one out, three sends."""
        request = handler.request_deserializer(await reader.single())
        call.watch_after(DISCONNECT_WATCH_AFTER_S)
        response = await handler.unary_unary(request, context)
        if context.code in (None, grpc.StatusCode.OK):
            await call.reply(handler.response_serializer(response))
        else:
            await call.finish(context.code, context.details)

    async def _stream(
        self, handler: Any, context: GrpcContext, reader: _Reader, call: _Call
    ) -> None:
        encode = handler.response_serializer

        async def write(message: Any) -> None:
            await call.message(encode(message))

        context.writer = write
        if handler.request_streaming:
            # While the body streams a disconnect surfaces in the reader; once it ended,
            # the call's watch takes over.
            reader.on_end = lambda: call.watch_after(0.0)
            request: Any = reader.stream(handler.request_deserializer)
        else:
            request = handler.request_deserializer(await reader.single())
            call.watch_after(0.0)  # streams are long: watch for the client going away
        if handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
            produced = behavior(request, context)
            if isinstance(produced, AsyncIterator):
                async for message in produced:
                    await write(message)
            else:  # a handler that writes through context.write and returns None
                await produced
        else:
            response = await handler.stream_unary(request, context)
            if context.code in (None, grpc.StatusCode.OK):
                await write(response)
        await call.finish(context.code or grpc.StatusCode.OK, context.details)


# A unary call that answers within this never pays for watching its stream (a pending
# receive() per call cost about a fifth of a small model's request); one that takes longer
# (queued, or a slow model) is cancelled when its client goes away.
DISCONNECT_WATCH_AFTER_S = 0.02


class _Call:
    """The response side of one stream: headers once, framed messages, then trailers; and
    the watch that cancels the call's task when the client goes away."""

    def __init__(self, send: Send, receive: Receive) -> None:
        self._send = send
        self._receive = receive
        self._started = False
        self._finished = False
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        self.cancelled_by_client = False
        self.handled = False

    def watch_after(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._start_watch)

    def _start_watch(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        # Never cancelled: the server resolves this pending receive() when the stream ends,
        # and one cancelled under it makes it log an error. It returns on its own then.
        while True:
            event = await self._receive()
            if event["type"] == "http.disconnect":
                if not self.handled and self._task is not None:
                    self.cancelled_by_client = True
                    self._task.cancel()
                return

    def done(self) -> None:
        self.handled = True
        if self._timer is not None:
            self._timer.cancel()

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._send(_RESPONSE_START)

    async def message(self, data: bytes) -> None:
        await self._start()
        await self._send(
            {
                "type": "http.response.body",
                "body": _PREFIX.pack(False, len(data)) + data,
                "more_body": True,
            }
        )

    async def reply(self, data: bytes) -> None:
        """A unary call's one response message and OK status."""
        self._started = self._finished = True
        # From here on the stream ends because we end it: the watch must not take the end
        # of the stream for a client going away, and cancel these very sends.
        self.handled = True
        await self._send(_RESPONSE_START)
        await self._send(
            {"type": "http.response.body", "body": _PREFIX.pack(False, len(data)) + data}
        )
        await self._send(_OK_TRAILERS)

    async def finish(self, code: grpc.StatusCode, details: str) -> None:
        if self._finished:
            return
        self._finished = self.handled = True  # as in reply
        await self._start()
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        trailers = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            quoted = urllib.parse.quote(fit_details(details), safe=_MESSAGE_SAFE)
            trailers.append((b"grpc-message", quoted.encode()))
        await self._send(
            {"type": "http.response.trailers", "headers": trailers, "more_trailers": False}
        )


_RESPONSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"application/grpc"),
        (b"grpc-accept-encoding", b"identity,deflate,gzip"),
    ],
    "trailers": True,
}
_OK_TRAILERS = {
    "type": "http.response.trailers",
    "headers": [(b"grpc-status", b"0")],
    "more_trailers": False,
}


class _Reader:
    """Length-prefixed gRPC messages out of the ASGI request body."""

    def __init__(self, receive: Receive, limit: int, encoding: str = "identity") -> None:
        self._receive = receive
        self._limit = limit
        self._encoding = encoding
        self._buffer = bytearray()
        self._ended = False
        self.on_end: Callable[[], None] | None = None

    async def _fill(self, size: int) -> bool:
        """Buffer at least `size` bytes; False when the body ended first."""
        while len(self._buffer) < size:
            if self._ended:
                return False
            event = await self._receive()
            if event["type"] == "http.disconnect":
                raise _ClientGone
            self._buffer += event.get("body", b"")
            self._ended = not event.get("more_body", False)
        return True

    async def next(self) -> bytes | None:
        """The next message, or None at a clean end of the body."""
        if not await self._fill(_PREFIX.size):
            if self._buffer:
                raise _Abort(grpc.StatusCode.INTERNAL, "the request ended inside a message prefix")
            return None
        compressed, length = _PREFIX.unpack_from(self._buffer)
        self._check(compressed, length)
        if not await self._fill(_PREFIX.size + length):
            raise _Abort(grpc.StatusCode.INTERNAL, "the request ended inside a message")
        data = bytes(self._buffer[_PREFIX.size : _PREFIX.size + length])
        del self._buffer[: _PREFIX.size + length]
        return self._payload(compressed, data)

    async def single(self) -> bytes:
        """The one message of a unary request."""
        if not self._buffer and not self._ended:
            event = await self._receive()
            if event["type"] == "http.disconnect":
                raise _ClientGone
            body = event.get("body", b"")
            if not event.get("more_body", False):  # the usual case: the body in one piece
                self._ended = True
                return self._only_message(body)
            self._buffer += body
        data = await self.next()
        if data is None:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "the request carries no message")
        if await self.next() is not None:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "a unary request carries one message")
        return data

    def _only_message(self, body: bytes) -> bytes:
        """The message of a complete body that must hold exactly one."""
        if len(body) < _PREFIX.size:
            if body:
                raise _Abort(grpc.StatusCode.INTERNAL, "the request ended inside a message prefix")
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "the request carries no message")
        compressed, length = _PREFIX.unpack_from(body)
        self._check(compressed, length)
        end = _PREFIX.size + length
        if len(body) < end:
            raise _Abort(grpc.StatusCode.INTERNAL, "the request ended inside a message")
        if len(body) > end:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "a unary request carries one message")
        return self._payload(compressed, body[_PREFIX.size :])

    def _check(self, compressed: bool, length: int) -> None:
        if compressed and self._encoding == "identity":
            raise _Abort(
                grpc.StatusCode.INTERNAL, "a compressed message without a grpc-encoding header"
            )
        if length > self._limit:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({length} vs. {self._limit})",
            )

    def _payload(self, compressed: bool, data: bytes) -> bytes:
        """A message's bytes, decompressed when its flag says so (within the size limit)."""
        if not compressed:
            return data
        wbits = 16 + zlib.MAX_WBITS if self._encoding == "gzip" else zlib.MAX_WBITS
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, self._limit + 1)
        except zlib.error:
            raise _Abort(
                grpc.StatusCode.INTERNAL, f"a message is not valid {self._encoding} data"
            ) from None
        if len(out) > self._limit:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max (over {self._limit} decompressed)",
            )
        return out

    async def stream(self, decode: Callable[[bytes], Any]) -> AsyncIterator[Any]:
        while (data := await self.next()) is not None:
            yield decode(data)
        if self.on_end is not None:
            self.on_end()


def _metadata(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    found: list[tuple[str, str | bytes]] = []
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1")
        if key.startswith(":") or key in _NOT_METADATA:
            continue
        found.append((key, raw_value if key.endswith("-bin") else raw_value.decode("latin-1")))
    return tuple(found)


_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_ENCODINGS = ("identity", "gzip", "deflate")


def _call_headers(headers: list[tuple[bytes, bytes]]) -> tuple[float | None, str]:
    """The call's deadline (from `grpc-timeout`) and its messages' `grpc-encoding`."""
    deadline, encoding = None, "identity"
    for key, value in headers:
        if key == b"grpc-timeout":
            match = _TIMEOUT.fullmatch(value)
            if match is None:
                text = value.decode("latin-1")
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid grpc-timeout {text!r}")
            unit = _TIMEOUT_UNITS[match.group(2).decode()]
            deadline = time.monotonic() + int(match.group(1)) * unit
        elif key == b"grpc-encoding":
            encoding = value.decode("latin-1").strip().lower()
            if encoding not in _ENCODINGS:
                raise _Abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"grpc-encoding {encoding!r} is not supported; use {', '.join(_ENCODINGS)}",
                )
    return deadline, encoding


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def is_grpc(scope: Scope) -> bool:
    """Whether an ASGI http call carries gRPC (by its content type)."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            # application/grpc, +proto or ;params; not grpc-web, which this codec does not speak
            return value == b"application/grpc" or value[16:17] in (b"+", b";")
    return False
