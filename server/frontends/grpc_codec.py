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
import base64
import binascii
import logging
import re
import struct
import time
import urllib.parse
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
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

Code = grpc.StatusCode

# The statuses this codec answers where a gRPC library, not the application, decides
# (grpc's doc/statuscodes.md); README's front-end section shows the same table, and a unit
# test triggers every row. Undecodable request bytes are not here: every service refuses
# them with INVALID_ARGUMENT and a sentence (status.guard_decoding), under both front ends.
PROTOCOL_STATUS: dict[str, grpc.StatusCode] = {
    "unknown service or method": Code.UNIMPLEMENTED,
    "gRPC over HTTP/1.1": Code.UNIMPLEMENTED,
    "a unary call with no message or more than one": Code.UNIMPLEMENTED,
    "a message over the size limit (also once decompressed)": Code.RESOURCE_EXHAUSTED,
    "a body that ends inside a message or its prefix": Code.INTERNAL,
    "a compressed message without grpc-encoding": Code.INTERNAL,
    "a message that does not decompress": Code.INTERNAL,
    "a grpc-encoding other than identity, gzip, deflate": Code.UNIMPLEMENTED,
    "a malformed grpc-timeout": Code.INTERNAL,
    "the deadline passed": Code.DEADLINE_EXCEEDED,
    "the server is shutting down": Code.UNAVAILABLE,
    # statuscodes.md says UNKNOWN; ours (STYLE.md 2.4) is INTERNAL with a request id.
    "an unexpected exception in a handler": Code.INTERNAL,
}


def _refuse(condition: str, details: str) -> _Abort:
    """The refusal PROTOCOL_STATUS names for `condition`, with its sentence."""
    return _Abort(PROTOCOL_STATUS[condition], details)


class _Abort(grpc.aio.AbortError):
    """Raised by `abort`: carries the status to the codec. An AbortError, as grpc.aio's,
    so that `map_errors` lets it pass."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _ClientGone(asyncio.CancelledError):
    """The client reset the stream or closed the connection while we read its request.

    A cancellation, as grpc.aio cancels a handler whose client went away: the handler
    unwinds (an upload aborts) and no `except Exception` takes it for a failure of its own.
    """


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


Metadata = Sequence[tuple[str, str | bytes]]


class GrpcContext:
    """The part of `grpc.aio.ServicerContext` our handlers use, over one HTTP/2 stream."""

    def __init__(
        self, headers: list[tuple[bytes, bytes]], deadline: float | None, scope: Scope, call: _Call
    ) -> None:
        self._headers = headers
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self._deadline = deadline
        self._scope = scope
        self._call = call
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

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> None:
        if trailing_metadata:
            self.set_trailing_metadata(trailing_metadata)
        raise _Abort(code, details)

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        """Send the response headers now, with `metadata` (before any message, once)."""
        await self._call.send_headers(_encode_metadata(metadata))

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        """Metadata to send in the trailers, beside the status."""
        self._call.trailing = _encode_metadata(metadata)

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
                raise _refuse("gRPC over HTTP/1.1", "gRPC needs HTTP/2")
            if self.refusing:  # as grpc.aio after stop(): in-flight calls finish, new ones go
                raise _refuse("the server is shutting down", self.refusing)
            handler = self.table.lookup(method)
            if handler is None:
                raise _refuse("unknown service or method", f"Method not found: {method}")
            deadline, encoding = _call_headers(headers)
            context = GrpcContext(headers, deadline, scope, call)
            # With a deadline a receive() or send() can be cancelled under it.
            call.shielded = deadline is not None
            reader = _Reader(receive, self.max_message_bytes, encoding, call.shielded)
            if deadline is None:  # the common case: no timer to arm
                await self._dispatch(handler, context, reader, call)
            else:
                await self._dispatch_by(deadline, handler, context, reader, call)
        except _Abort as abort:
            ending = abort
        except _ClientGone:  # nobody listens any more: nothing to send
            _log_gone(method)
            return
        except asyncio.CancelledError:
            if call.cancelled_by_client:  # as above, noticed by the call's watch
                _log_gone(method)
                return
            if not call.expired:
                raise
            call.uncancel()  # our own timer's cancellation, taken back: the call ends here
            ending = _refuse("the deadline passed", "Deadline Exceeded")
        except Exception as exc:  # a bug of ours: the client gets a sentence, the log the rest
            request_id = uuid.uuid4().hex[:16]
            logger.error("internal error in %s (request id %s)", method, request_id, exc_info=exc)
            ending = _refuse(
                "an unexpected exception in a handler", f"internal error (request id {request_id})"
            )
        else:
            return
        finally:
            call.done()
        try:  # a status that ends the call early (outside the handlers above: it may fail too)
            await call.finish(ending.code, ending.details)
        except _ClientGone:
            _log_gone(method)

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
        """`_dispatch`, cancelled when the client's deadline passes (then DEADLINE_EXCEEDED).

        Our own timer rather than asyncio.timeout: it leaves alone an answer already going
        out, which a cancellation would cut between its body and its trailers."""
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + (deadline - time.monotonic()), call.on_deadline)
        try:
            await self._dispatch(handler, context, reader, call)
        finally:
            timer.cancel()

    async def _unary(
        self, handler: Any, context: GrpcContext, reader: _Reader, call: _Call
    ) -> None:
        """The hot path (every inference call): one message in, one out, three sends."""
        request = (handler.request_deserializer or _same)(await reader.single())
        call.watch_after(DISCONNECT_WATCH_AFTER_S)
        response = await handler.unary_unary(request, context)
        if context.code in (None, grpc.StatusCode.OK):
            await call.reply((handler.response_serializer or _same)(response))
        else:
            await call.finish(context.code, context.details)

    async def _stream(
        self, handler: Any, context: GrpcContext, reader: _Reader, call: _Call
    ) -> None:
        encode = handler.response_serializer or _same
        decode = handler.request_deserializer or _same

        async def write(message: Any) -> None:
            await call.message(encode(message))

        context.writer = write
        if handler.request_streaming:
            # While the body streams a disconnect surfaces in the reader; once it ended,
            # the call's watch takes over.
            reader.on_end = lambda: call.watch_after(0.0)
            request: Any = reader.stream(decode)
        else:
            request = decode(await reader.single())
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


def _same(data: Any) -> Any:
    """A handler registered without a (de)serializer gets and gives bytes, as in grpc."""
    return data


def _log_gone(method: str) -> None:
    logger.info("%s: the client went away (it cancelled, or its deadline passed)", method)


# A unary call that answers within this never pays for watching its stream (a pending
# receive() per call cost about a fifth of a small model's request); one that takes longer
# (queued, or a slow model) is cancelled when its client goes away.
DISCONNECT_WATCH_AFTER_S = 0.02


class _Call:
    """The response side of one stream: headers once, framed messages, then trailers; and
    the watch that cancels the call's task when the client goes away."""

    def __init__(self, send: Send, receive: Receive) -> None:
        self._server_send = send
        self._receive = receive
        self.shielded = False
        """Whether the task may be cancelled under a send (a deadline, or the watch)."""
        self._started = False
        self._finished = False
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        self.cancelled_by_client = False
        self.expired = False
        self._cancels = 0  # cancellations of the task this call requested
        self.handled = False
        self.trailing: list[tuple[bytes, bytes]] = []
        """Trailing metadata the handler set, sent beside the status."""

    def watch_after(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._start_watch)

    def _start_watch(self) -> None:
        self.shielded = True
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.shielded:
            await self._send_now(message)
            return
        try:
            # A cancellation must not reach the pending send itself: the ASGI server
            # completes it all the same, and pyvoy then logs an InvalidStateError.
            await asyncio.shield(self._server_send(message))
        except OSError:
            raise _ClientGone from None

    async def _send_now(self, message: dict[str, Any]) -> None:
        """A send nothing of ours cancels (the call's last ones, or with nothing to)."""
        try:
            await self._server_send(message)
        except OSError:  # what ASGI servers raise from send() once the client is gone
            raise _ClientGone from None

    async def _watch(self) -> None:
        # Never cancelled: the server resolves this pending receive() when the stream ends,
        # and one cancelled under it makes it log an error. It returns on its own then.
        while True:
            event = await self._receive()
            if event["type"] == "http.disconnect":
                if not self.handled:
                    self.cancelled_by_client = True
                    self._cancel()
                return

    def on_deadline(self) -> None:
        """The client's deadline passed: cancel the handler, unless the answer is already
        going out (it then goes out whole)."""
        self.expired = True
        if not self._finished:
            self._cancel()

    def _cancel(self) -> None:
        if self._task is not None:
            self._cancels += 1
            self._task.cancel()

    def uncancel(self) -> None:
        """Take back the cancellations this call requested, once it handled them."""
        while self._cancels and self._task is not None:
            self._cancels -= 1
            self._task.uncancel()

    def done(self) -> None:
        self.handled = True
        if self._timer is not None:
            self._timer.cancel()

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._send(_RESPONSE_START)

    async def send_headers(self, metadata: list[tuple[bytes, bytes]]) -> None:
        """The response headers with the handler's initial metadata (grpc.aio's
        send_initial_metadata)."""
        if self._started:
            raise grpc.aio.UsageError("initial metadata was already sent")
        self._started = True
        await self._send({**_RESPONSE_START, "headers": [*_RESPONSE_START["headers"], *metadata]})

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
        # From here on the stream ends because we end it: neither the watch (the end of the
        # stream is no client going away) nor the deadline may cancel these very sends.
        self._finished = self.handled = True
        if not self._started:
            self._started = True
            await self._send_now(_RESPONSE_START)
        await self._send_now(
            {"type": "http.response.body", "body": _PREFIX.pack(False, len(data)) + data}
        )
        if self.trailing:
            await self._trailers([*_OK_TRAILERS["headers"], *self.trailing])
        else:
            await self._send_now(_OK_TRAILERS)

    async def finish(self, code: grpc.StatusCode, details: str) -> None:
        if self._finished:
            return
        self._finished = self.handled = True  # as in reply
        if not self._started:
            self._started = True
            await self._send_now(_RESPONSE_START)
        await self._send_now({"type": "http.response.body", "body": b"", "more_body": False})
        trailers = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            quoted = urllib.parse.quote(fit_details(details), safe=_MESSAGE_SAFE)
            trailers.append((b"grpc-message", quoted.encode()))
        await self._trailers([*trailers, *self.trailing])

    async def _trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        await self._send_now(
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
    """Length-prefixed gRPC messages out of the ASGI request body.

    The length prefix is checked against the limit before any of the message is read, so
    an oversize message is refused without being buffered. A message still arriving is
    copied chunk by chunk into one buffer of its size, each chunk dropped once copied:
    holding a large message's thousands of chunks until the last one came made the
    allocator keep their pages (Envoy's tcmalloc does not hand back pages of small
    allocations soon after a peak), and the buffer is one large allocation it does.
    """

    def __init__(
        self, receive: Receive, limit: int, encoding: str = "identity", shield: bool = False
    ) -> None:
        self._receive = receive
        self._limit = limit
        self._encoding = encoding
        self._shield = shield
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes of _chunks[0] already taken
        self._buffered = 0  # bytes received and not yet taken
        self._ended = False
        self.on_end: Callable[[], None] | None = None

    async def _event(self) -> dict[str, Any]:
        received = self._receive()
        if self._shield and not (isinstance(received, asyncio.Future) and received.done()):
            # A cancellation (the deadline) must not reach the pending receive() itself:
            # the ASGI server resolves it later all the same, and pyvoy then logs an
            # InvalidStateError for the cancelled future.
            event = await asyncio.shield(received)
        else:
            event = await received
        if event["type"] == "http.disconnect":
            raise _ClientGone
        return event

    async def _fill(self, size: int) -> bool:
        """Buffer at least `size` bytes; False when the body ended first."""
        while self._buffered < size:
            if self._ended:
                return False
            event = await self._event()
            body = event.get("body", b"")
            if body:
                self._chunks.append(body)
                self._buffered += len(body)
            self._ended = not event.get("more_body", False)
        return True

    def _take(self, size: int) -> bytes:
        """The next `size` buffered bytes, dropping the chunks they used up."""
        first = self._chunks[0]
        if self._offset == 0 and len(first) == size:  # a chunk that is just this
            self._chunks.popleft()
            self._buffered -= size
            return first
        parts: list[memoryview] = []
        left = size
        while left:
            chunk = self._chunks[0]
            end = min(len(chunk), self._offset + left)
            parts.append(memoryview(chunk)[self._offset : end])
            left -= end - self._offset
            if end == len(chunk):
                self._chunks.popleft()
                self._offset = 0
            else:
                self._offset = end
        self._buffered -= size
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    async def next(self) -> bytes | None:
        """The next message, or None at a clean end of the body."""
        if not await self._fill(_PREFIX.size):
            if self._buffered:
                raise _truncated("prefix")
            return None
        compressed, length = _PREFIX.unpack(self._take(_PREFIX.size))
        self._check(compressed, length)
        if self._buffered >= length:  # the usual case: it came with its prefix
            return self._payload(compressed, self._take(length) if length else b"")
        return self._payload(compressed, await self._gather(length))

    async def _gather(self, length: int) -> bytes:
        """The next `length` bytes, of which fewer are buffered: copied into one buffer as
        they arrive, each chunk dropped once copied."""
        buffer = bytearray(length)
        view = memoryview(buffer)
        filled = 0
        while self._chunks:  # what is buffered all belongs to this message
            part = memoryview(self._chunks.popleft())[self._offset :]
            view[filled : filled + len(part)] = part
            filled += len(part)
            self._offset = 0
        self._buffered = 0
        while filled < length:
            if self._ended:
                raise _truncated("message")
            event = await self._event()
            self._ended = not event.get("more_body", False)
            body = event.pop("body", b"")
            used = min(len(body), length - filled)
            view[filled : filled + used] = memoryview(body)[:used]
            filled += used
            if used < len(body):  # the next message begins in this chunk
                self._chunks.append(body)
                self._offset, self._buffered = used, len(body) - used
            del body, event
        view.release()
        return bytes(buffer)

    async def single(self) -> bytes:
        """The one message of a unary request."""
        if not self._buffered and not self._ended:
            event = await self._event()
            body = event.get("body", b"")
            if not event.get("more_body", False):  # the usual case: the body in one piece
                self._ended = True
                return self._only_message(body)
            if body:
                self._chunks.append(body)
                self._buffered += len(body)
        data = await self.next()
        if data is None:
            raise _cardinality("the request carries no message")
        if await self.next() is not None:
            raise _cardinality("a unary request carries one message")
        return data

    def _only_message(self, body: bytes) -> bytes:
        """The message of a complete body that must hold exactly one."""
        if len(body) < _PREFIX.size:
            if body:
                raise _truncated("prefix")
            raise _cardinality("the request carries no message")
        compressed, length = _PREFIX.unpack_from(body)
        self._check(compressed, length)
        end = _PREFIX.size + length
        if len(body) < end:
            raise _truncated("message")
        if len(body) > end:
            raise _cardinality("a unary request carries one message")
        return self._payload(compressed, body[_PREFIX.size :])

    def _check(self, compressed: bool, length: int) -> None:
        if compressed and self._encoding == "identity":
            raise _refuse(
                "a compressed message without grpc-encoding",
                "a compressed message without a grpc-encoding header",
            )
        if length > self._limit:
            raise _refuse(
                "a message over the size limit (also once decompressed)",
                f"Received message larger than max ({length} vs. {self._limit})",
            )

    def _payload(self, compressed: bool, data: bytes) -> bytes:
        """A message's bytes, decompressed when its flag says so (within the size limit)."""
        if not compressed:
            return data
        wbits = 16 + zlib.MAX_WBITS if self._encoding == "gzip" else zlib.MAX_WBITS
        inflater = zlib.decompressobj(wbits)
        try:
            # At most limit + 1 bytes: a small bomb never inflates past what we would refuse.
            out = inflater.decompress(data, self._limit + 1)
            complete = inflater.eof
        except zlib.error:
            complete = False
            out = b""
        if len(out) > self._limit:
            raise _refuse(
                "a message over the size limit (also once decompressed)",
                f"Received message larger than max (over {self._limit} decompressed)",
            )
        if not complete:
            raise _refuse(
                "a message that does not decompress",
                f"a message is not valid {self._encoding} data",
            )
        return out

    async def stream(self, decode: Callable[[bytes], Any]) -> AsyncIterator[Any]:
        while (data := await self.next()) is not None:
            yield decode(data)
        if self.on_end is not None:
            self.on_end()


def _truncated(part: str) -> _Abort:
    return _refuse(
        "a body that ends inside a message or its prefix", f"the request ended inside a {part}"
    )


def _cardinality(details: str) -> _Abort:
    return _refuse("a unary call with no message or more than one", details)


def _metadata(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    found: list[tuple[str, str | bytes]] = []
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1")
        if key.startswith(":") or key in _NOT_METADATA:
            continue
        if key.endswith("-bin"):  # base64 on the wire, padded or not; the handler gets bytes
            try:
                found.append((key, base64.b64decode(raw_value + b"=" * (-len(raw_value) % 4))))
            except binascii.Error:
                continue  # as grpc's own servers: an undecodable binary header is dropped
        else:
            found.append((key, raw_value.decode("latin-1")))
    return tuple(found)


def _encode_metadata(metadata: Metadata) -> list[tuple[bytes, bytes]]:
    """Metadata as HTTP/2 headers: `-bin` values base64 without padding, as grpc sends them."""
    headers = []
    for key, value in metadata:
        name = key.lower()
        if name.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            headers.append((name.encode(), base64.b64encode(raw).rstrip(b"=")))
        else:
            text = value.decode() if isinstance(value, bytes) else value
            headers.append((name.encode(), text.encode("ascii")))
    return headers


_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_ENCODINGS = ("identity", "gzip", "deflate")


def _call_headers(headers: list[tuple[bytes, bytes]]) -> tuple[float | None, str]:
    """The call's deadline (from `grpc-timeout`) and its messages' `grpc-encoding`."""
    deadline, encoding = None, "identity"
    for key, value in headers:
        if key == b"grpc-timeout":
            deadline = time.monotonic() + parse_timeout(value)
        elif key == b"grpc-encoding":
            encoding = value.decode("latin-1").strip().lower()
            if encoding not in _ENCODINGS:
                raise _refuse(
                    "a grpc-encoding other than identity, gzip, deflate",
                    f"grpc-encoding {encoding[:32]!r} is not supported; use "
                    f"{', '.join(_ENCODINGS)}",
                )
    return deadline, encoding


def parse_timeout(value: bytes) -> float:
    """Seconds in a `grpc-timeout` value: at most 8 digits and a unit (H M S m u n)."""
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        text = value[:32].decode("latin-1")
        raise _refuse("a malformed grpc-timeout", f"invalid grpc-timeout {text!r}")
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2).decode()]


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


# An RFC 9110 token: what a media subtype may hold.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")


def is_grpc_content_type(value: bytes) -> bool:
    """Whether a content-type value names gRPC: `application/grpc` or
    `application/grpc+<subtype>` (`+proto`, `+json`), with or without parameters.

    Media types are case-insensitive and parameters follow a `;` with optional whitespace
    (RFC 9110 8.3.1). `application/grpc-web*` is not gRPC: this codec does not speak it.
    """
    media_type = value.split(b";", 1)[0].strip().lower()
    if media_type == b"application/grpc":
        return True
    prefix = b"application/grpc+"
    return media_type.startswith(prefix) and _TOKEN.fullmatch(media_type[len(prefix) :]) is not None


def is_grpc(scope: Scope) -> bool:
    """Whether an ASGI http call carries gRPC (by its content type; none is not gRPC)."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            return is_grpc_content_type(value)
    return False
