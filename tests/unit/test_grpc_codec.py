"""The gRPC codec (server/frontends/grpc_codec.py) driven through its interface, ASGI: a
fake HTTP/2 stream hands it request events and records what it sends. Framing, limits,
cardinality, deadlines, trailers, compression, metadata and content types, in
milliseconds each; the same codec under real Envoy is tested in
tests/integration/test_grpc_interop.py and test_front_ends.py."""

from __future__ import annotations

import asyncio
import gzip
import logging
import struct
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest

from moduleserve.server.frontends.grpc_codec import (
    PROTOCOL_STATUS,
    GrpcCodec,
    HandlerTable,
    is_grpc,
    is_grpc_content_type,
    parse_timeout,
)

Code = grpc.StatusCode
LIMIT = 1024
SERVICE = "test.Echo"
SPECIAL = "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n"


def frame(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">?I", compressed, len(message)) + message


class Stream:
    """One HTTP/2 stream as an ASGI server presents it. `receive` hands out the request's
    events in order, then waits, as a server does while the client sends nothing; `close`
    ends the stream (every pending receive gets http.disconnect, as the server does)."""

    def __init__(self, events: Iterable[dict[str, Any]], send_delay: float = 0.0) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for event in events:
            self.events.put_nowait(event)
        self.sent: list[dict[str, Any]] = []
        self.pending: list[asyncio.Future[dict[str, Any]]] = []
        self.closed = False
        self.send_delay = send_delay
        self.sends: list[asyncio.Future[None]] = []
        self.gone = False  # sends fail as an ASGI server's do once the client is gone

    def receive(self) -> asyncio.Future[dict[str, Any]]:
        """A future, as pyvoy returns: one cancelled under it is a bug of the caller's."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if not self.events.empty():
            future.set_result(self.events.get_nowait())
        elif self.closed:
            future.set_result({"type": "http.disconnect"})
        else:
            self.pending.append(future)
        return future

    def push(self, event: dict[str, Any]) -> None:
        waiting = [f for f in self.pending if not f.done()]
        if waiting:
            waiting[0].set_result(event)
        else:
            self.events.put_nowait(event)

    def close(self) -> None:
        self.closed = True
        for future in self.pending:
            if not future.done():
                future.set_result({"type": "http.disconnect"})

    def send(self, message: dict[str, Any]) -> asyncio.Future[None]:
        """A future the server completes once the message is out (after `send_delay`), as
        pyvoy does: completing one that was cancelled under it raises InvalidStateError,
        which asyncio logs (and the test fails)."""
        self.sent.append(message)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.gone:
            future.set_exception(ConnectionResetError("the client went away"))
        elif self.send_delay:
            asyncio.get_running_loop().call_later(self.send_delay, future.set_result, None)
        else:
            future.set_result(None)
        self.sends.append(future)
        return future

    # what the client sees

    @property
    def headers(self) -> dict[bytes, bytes]:
        [start] = [m for m in self.sent if m["type"] == "http.response.start"]
        return dict(start["headers"])

    @property
    def trailers(self) -> dict[bytes, bytes]:
        [trailers] = [m for m in self.sent if m["type"] == "http.response.trailers"]
        return dict(trailers["headers"])

    @property
    def code(self) -> grpc.StatusCode:
        value = int(self.trailers[b"grpc-status"])
        return next(code for code in Code if code.value[0] == value)

    @property
    def details(self) -> str:
        return urllib.parse.unquote(self.trailers.get(b"grpc-message", b"").decode("ascii"))

    @property
    def messages(self) -> list[bytes]:
        data = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        found = []
        while data:
            compressed, length = struct.unpack(">?I", data[:5])
            assert not compressed
            found.append(data[5 : 5 + length])
            data = data[5 + length :]
        return found


def body(*chunks: bytes) -> list[dict[str, Any]]:
    """The request body as ASGI http.request events, one per chunk (the last ends it)."""
    if not chunks:
        return [{"type": "http.request", "body": b"", "more_body": False}]
    return [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]


def scope(
    method: str = "Unary", headers: Iterable[tuple[str, str]] = (), http_version: str = "2"
) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": http_version,
        "method": "POST",
        "path": f"/{SERVICE}/{method}",
        "headers": [
            (b"content-type", b"application/grpc"),
            *((k.encode(), v.encode()) for k, v in headers),
        ],
        "client": ("127.0.0.1", 5555),
    }


class Service:
    """Handlers over raw bytes, registered as a grpc generic handler (as Core registers)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.caught_by_except_exception = False
        self.collected: list[bytes] = []
        self.metadata: tuple[tuple[str, str | bytes], ...] = ()

    async def unary(self, request: bytes, context: Any) -> bytes:
        self.metadata = context.invocation_metadata()
        return request

    async def sleep(self, request: bytes, context: Any) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""

    async def fail(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError("a bug")

    async def own_timeout(self, request: bytes, context: Any) -> bytes:
        raise TimeoutError("a timeout of the handler's own, not the client's deadline")

    async def abort(self, request: bytes, context: Any) -> bytes:
        await context.abort(Code.INVALID_ARGUMENT, SPECIAL)
        raise AssertionError("abort returned")

    async def metadata_echo(self, request: bytes, context: Any) -> bytes:
        await context.send_initial_metadata([("x-initial", "hello")])
        context.set_trailing_metadata([("x-trailing-bin", b"\x00\xff\x01")])
        return request

    async def collect(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        try:
            async for request in requests:
                self.collected.append(request)
        except Exception:  # what a client going away must never look like
            self.caught_by_except_exception = True
            raise
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"".join(self.collected)

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    def table(self) -> HandlerTable:
        table = HandlerTable()
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "OwnTimeout": grpc.unary_unary_rpc_method_handler(self.own_timeout),
            "Abort": grpc.unary_unary_rpc_method_handler(self.abort),
            "Metadata": grpc.unary_unary_rpc_method_handler(self.metadata_echo),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }
        table.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        return table


async def run(
    events: Iterable[dict[str, Any]],
    method: str = "Unary",
    headers: Iterable[tuple[str, str]] = (),
    service: Service | None = None,
    http_version: str = "2",
    refusing: str = "",
) -> Stream:
    """One call through a fresh codec; the stream afterwards."""
    codec = GrpcCodec((service or Service()).table(), LIMIT)
    codec.refusing = refusing
    stream = Stream(events)
    await asyncio.wait_for(
        codec(scope(method, headers, http_version), stream.receive, stream.send), 10
    )
    stream.close()  # the server ends the stream: pending receives resolve
    await asyncio.sleep(0)
    return stream


# -- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        [frame(b"hello")],
        [frame(b"hello")[:2], frame(b"hello")[2:]],  # the prefix split
        [frame(b"hello")[:5], frame(b"hello")[5:7], frame(b"hello")[7:]],  # the message split
        [bytes([b]) for b in frame(b"hello")],  # a byte per chunk
        [frame(b"hello"), b""],  # an empty last chunk
    ],
    ids=["one chunk", "prefix split", "message split", "byte chunks", "empty end"],
)
async def test_a_message_arrives_whole_however_the_body_is_cut(chunks: list[bytes]) -> None:
    stream = await run(body(*chunks))
    assert (stream.code, stream.messages) == (Code.OK, [b"hello"])
    assert stream.headers[b"content-type"] == b"application/grpc"


@pytest.mark.parametrize(
    ("chunks", "details"),
    [
        ([frame(b"hello")[:3]], "the request ended inside a prefix"),
        ([frame(b"hello")[:1], frame(b"hello")[1:3]], "the request ended inside a prefix"),
        ([frame(b"hello")[:7]], "the request ended inside a message"),
        ([frame(b"hello")[:5], frame(b"hello")[5:7]], "the request ended inside a message"),
    ],
    ids=["prefix", "prefix in chunks", "message", "message in chunks"],
)
async def test_a_truncated_body_is_internal(chunks: list[bytes], details: str) -> None:
    stream = await run(body(*chunks))
    assert (stream.code, stream.details) == (Code.INTERNAL, details)
    assert stream.messages == []


async def test_streamed_messages_arrive_in_order_across_chunk_boundaries() -> None:
    data = frame(b"a") + frame(b"") + frame(b"b" * 300) + frame(b"c")
    service = Service()
    stream = await run(body(data[:3], data[3:9], data[9:200], data[200:]), "Collect", (), service)
    assert stream.code == Code.OK
    assert service.collected == [b"a", b"", b"b" * 300, b"c"]


async def test_a_bidirectional_stream_answers_each_message() -> None:
    stream = await run(body(frame(b"1"), frame(b"22") + frame(b"333")), "Chat")
    assert (stream.code, stream.messages) == (Code.OK, [b"1", b"22", b"333"])


# -- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_message_of_exactly_the_limit_is_accepted(chunked: bool) -> None:
    data = frame(b"x" * LIMIT)
    stream = await run(body(data[:100], data[100:]) if chunked else body(data))
    assert (stream.code, stream.messages) == (Code.OK, [b"x" * LIMIT])


@pytest.mark.parametrize("chunked", [False, True])
async def test_one_byte_over_the_limit_is_resource_exhausted(chunked: bool) -> None:
    data = frame(b"x" * (LIMIT + 1))
    stream = await run(body(data[:100], data[100:]) if chunked else body(data))
    assert stream.code == Code.RESOURCE_EXHAUSTED
    assert stream.details == f"Received message larger than max ({LIMIT + 1} vs. {LIMIT})"


async def test_an_oversize_message_is_refused_at_its_prefix_without_reading_it() -> None:
    """Only the prefix arrives, and the body stays open: the refusal must not wait for (or
    buffer) the message it announces."""
    stream = await run([{"type": "http.request", "body": frame(b"")[:1] + b"\x01\x00\x00\x00",
                         "more_body": True}])  # fmt: skip
    assert stream.code == Code.RESOURCE_EXHAUSTED
    assert stream.details == f"Received message larger than max ({2**24} vs. {LIMIT})"


async def test_a_compressed_bomb_is_refused_once_it_inflates_past_the_limit() -> None:
    bomb = gzip.compress(bytes(LIMIT * 500))  # half a MiB of zeros in about 500 bytes
    assert len(bomb) <= LIMIT  # within the limit as sent
    stream = await run(body(frame(bomb, True)), headers=[("grpc-encoding", "gzip")])
    assert stream.code == Code.RESOURCE_EXHAUSTED
    assert stream.details == f"Received message larger than max (over {LIMIT} decompressed)"


# -- cardinality ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "details"),
    [
        ([], "the request carries no message"),
        ([b"", b""], "the request carries no message"),
        ([frame(b"a") + frame(b"b")], "a unary request carries one message"),
        ([frame(b"a"), frame(b"b")], "a unary request carries one message"),
    ],
    ids=["no message", "no message in chunks", "two messages", "two messages in chunks"],
)
async def test_a_unary_call_without_exactly_one_message_is_unimplemented(
    chunks: list[bytes], details: str
) -> None:
    stream = await run(body(*chunks))
    assert (stream.code, stream.details, stream.messages) == (Code.UNIMPLEMENTED, details, [])


# -- deadlines -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"2H", 7200.0),
        (b"3M", 180.0),
        (b"4S", 4.0),
        (b"5m", 0.005),
        (b"6u", 6e-6),
        (b"7n", 7e-9),
        (b"99999999S", 99999999.0),
        (b"0m", 0.0),
    ],
)
def test_grpc_timeout_units(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


MALFORMED_TIMEOUTS = ["", "1", "S", "123456789S", "1.5S", "-1S", "1s", "1 S", " 1S", "1SS", "1h"]


@pytest.mark.parametrize("value", MALFORMED_TIMEOUTS)
async def test_a_malformed_grpc_timeout_is_internal(value: str) -> None:
    stream = await run(body(frame(b"a")), headers=[("grpc-timeout", value)])
    assert (stream.code, stream.details) == (Code.INTERNAL, f"invalid grpc-timeout {value!r}")


async def test_the_server_itself_ends_a_call_past_its_deadline() -> None:
    """The client here never gives up (the fake stream stays open), so only the server's own
    timer can end the call: DEADLINE_EXCEEDED, and the handler is cancelled."""
    service = Service()
    started = time.monotonic()
    stream = await run(body(frame(b"")), "Sleep", [("grpc-timeout", "50m")], service)
    assert (stream.code, stream.details) == (Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert service.cancelled.is_set()
    assert time.monotonic() - started < 5  # generous: the handler would sleep 30 s


async def test_a_deadline_while_reading_the_body_never_cancels_the_pending_receive() -> None:
    """pyvoy resolves every receive() it handed out, and logs an InvalidStateError for one
    that was cancelled under it: the deadline must end the call around it."""
    codec = GrpcCodec(Service().table(), LIMIT)
    stream = Stream([{"type": "http.request", "body": frame(b"a"), "more_body": True}])
    headers = [("grpc-timeout", "50m")]
    await asyncio.wait_for(codec(scope("Collect", headers), stream.receive, stream.send), 10)
    assert stream.code == Code.DEADLINE_EXCEEDED
    assert stream.pending and not any(f.cancelled() for f in stream.pending)
    stream.close()
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("method", "code", "messages"),
    [("Unary", Code.OK, [b"late"]), ("Chat", Code.DEADLINE_EXCEEDED, [])],
    ids=["unary answer", "stream message"],
)
async def test_a_deadline_during_a_slow_send_never_cancels_the_send(
    method: str, code: Code, messages: list[bytes]
) -> None:
    """The deadline passes while the codec sends (the client reads slowly). A unary answer
    that was ready goes out whole: never cut between its body and its trailers. A stream
    still sending its messages ends with DEADLINE_EXCEEDED. No send is cancelled under the
    server either way."""
    codec = GrpcCodec(Service().table(), LIMIT)
    stream = Stream(body(frame(b"late")), send_delay=0.2)
    headers = [("grpc-timeout", "50m")]
    await asyncio.wait_for(codec(scope(method, headers), stream.receive, stream.send), 10)
    assert (stream.code, stream.messages) == (code, messages)
    assert not any(f.cancelled() for f in stream.sends)
    await asyncio.sleep(0.3)  # every send completes (a cancelled one would log an error)
    stream.close()


async def test_a_handlers_own_timeout_is_not_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="moduleserve"):
        stream = await run(body(frame(b"")), "OwnTimeout", [("grpc-timeout", "10S")])
    assert stream.code == Code.INTERNAL
    assert stream.details.startswith("internal error (request id ")


async def test_a_call_within_its_deadline_answers() -> None:
    stream = await run(body(frame(b"on time")), headers=[("grpc-timeout", "10S")])
    assert (stream.code, stream.messages) == (Code.OK, [b"on time"])


# -- a client that goes away ---------------------------------------------------------------


async def test_a_client_gone_mid_upload_cancels_the_handler_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Service()
    events = [
        {"type": "http.request", "body": frame(b"first"), "more_body": True},
        {"type": "http.disconnect"},
    ]
    with caplog.at_level(logging.DEBUG, logger="moduleserve"):
        stream = await run(events, "Collect", (), service)
    assert service.cancelled.is_set() and not service.caught_by_except_exception
    assert service.collected == [b"first"]
    assert stream.sent == []  # nobody listens: nothing is sent
    records = [r for r in caplog.records if r.name.startswith("moduleserve")]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (
            logging.INFO,
            f"/{SERVICE}/Collect: the client went away (it cancelled, or its deadline passed)",
        )
    ]
    assert all(r.exc_info is None for r in records)


async def test_a_unary_client_gone_after_the_watch_starts_cancels_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Service()
    codec = GrpcCodec(service.table(), LIMIT)
    stream = Stream(body(frame(b"")))
    with caplog.at_level(logging.INFO, logger="moduleserve"):
        call = asyncio.ensure_future(codec(scope("Sleep"), stream.receive, stream.send))
        await asyncio.sleep(0.2)  # past DISCONNECT_WATCH_AFTER_S: the watch's receive waits
        stream.push({"type": "http.disconnect"})
        await asyncio.wait_for(call, 10)
    assert service.cancelled.is_set()
    assert [r.levelno for r in caplog.records if r.name.startswith("moduleserve")] == [logging.INFO]
    stream.close()


async def test_a_client_gone_before_the_answer_is_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    codec = GrpcCodec(Service().table(), LIMIT)
    stream = Stream(body(frame(b"answer")))
    stream.gone = True
    with caplog.at_level(logging.INFO, logger="moduleserve"):
        await asyncio.wait_for(codec(scope("Unary"), stream.receive, stream.send), 10)
    records = [r for r in caplog.records if r.name.startswith("moduleserve")]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)]
    assert "the client went away" in records[0].getMessage()
    stream.close()


@pytest.mark.parametrize(
    ("method", "headers"),
    [("Nope", []), ("Sleep", [("grpc-timeout", "20m")])],
    ids=["refusal", "deadline"],
)
async def test_a_client_gone_before_an_early_status_is_one_info_line(
    method: str, headers: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    """The codec ends the call with a status of its own (UNIMPLEMENTED, DEADLINE_EXCEEDED),
    and the client is gone by then: nothing escapes to the ASGI server."""
    codec = GrpcCodec(Service().table(), LIMIT)
    stream = Stream(body(frame(b"")))
    stream.gone = True
    with caplog.at_level(logging.INFO, logger="moduleserve"):
        await asyncio.wait_for(codec(scope(method, headers), stream.receive, stream.send), 10)
    records = [r for r in caplog.records if r.name.startswith("moduleserve")]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)]
    assert "the client went away" in records[0].getMessage()
    stream.close()


# -- trailers, errors and metadata ----------------------------------------------------------


async def test_an_aborted_call_sends_its_message_percent_encoded() -> None:
    stream = await run(body(frame(b"")), "Abort")
    assert stream.code == Code.INVALID_ARGUMENT
    raw = stream.trailers[b"grpc-message"]
    assert all(0x20 <= byte < 0x7F for byte in raw)  # printable ASCII on the wire
    assert b"%0A" in raw and b"%E2%98%BA" in raw and b" " in raw  # spaces travel as they are
    assert stream.details == SPECIAL


async def test_an_unexpected_exception_is_internal_with_a_request_id_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="moduleserve"):
        stream = await run(body(frame(b"")), "Fail")
    assert stream.code == Code.INTERNAL
    assert stream.details.startswith("internal error (request id ")
    assert "a bug" not in stream.details and "Traceback" not in stream.details
    [record] = caplog.records
    assert record.exc_info is not None  # the traceback is for the log alone


async def test_metadata_binary_headers_initial_and_trailing() -> None:
    service = Service()
    stream = await run(
        body(frame(b"m")),
        "Metadata",
        [("x-user", "ann"), ("x-blob-bin", "AP8B"), ("grpc-timeout", "10S")],
        service,
    )
    assert stream.code == Code.OK and stream.messages == [b"m"]
    assert stream.headers[b"x-initial"] == b"hello"
    assert stream.trailers[b"x-trailing-bin"] == b"AP8B"  # base64 of 00 ff 01, unpadded
    stream = await run(body(frame(b"m")), "Unary", [("x-user", "ann"), ("x-a-bin", "AP8")], service)
    assert service.metadata == (("x-user", "ann"), ("x-a-bin", b"\x00\xff"))


# -- decompression -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_compressed_messages_are_inflated(encoding: str, compress: Any) -> None:
    message = b"compress me " * 20
    stream = await run(body(frame(compress(message), True)), headers=[("grpc-encoding", encoding)])
    assert (stream.code, stream.messages) == (Code.OK, [message])


async def test_an_uncompressed_message_with_an_encoding_is_taken_as_is() -> None:
    stream = await run(body(frame(b"plain")), headers=[("grpc-encoding", "gzip")])
    assert (stream.code, stream.messages) == (Code.OK, [b"plain"])


@pytest.mark.parametrize(
    ("headers", "message", "code", "details"),
    [
        ([("grpc-encoding", "br")], frame(b"x", True), Code.UNIMPLEMENTED,
         "grpc-encoding 'br' is not supported; use identity, gzip, deflate"),
        ([], frame(gzip.compress(b"x"), True), Code.INTERNAL,
         "a compressed message without a grpc-encoding header"),
        ([("grpc-encoding", "gzip")], frame(b"not gzip", True), Code.INTERNAL,
         "a message is not valid gzip data"),
        ([("grpc-encoding", "deflate")], frame(gzip.compress(b"x"), True), Code.INTERNAL,
         "a message is not valid deflate data"),
        ([("grpc-encoding", "gzip")], frame(gzip.compress(b"x" * 100)[:-9], True), Code.INTERNAL,
         "a message is not valid gzip data"),
    ],
    ids=["unknown encoding", "flag without encoding", "not gzip", "gzip as deflate", "cut short"],
)  # fmt: skip
async def test_decompression_refusals(
    headers: list[tuple[str, str]], message: bytes, code: Code, details: str
) -> None:
    stream = await run(body(message), headers=headers)
    assert (stream.code, stream.details) == (code, details)
    assert stream.headers[b"grpc-accept-encoding"] == b"identity,deflate,gzip"


# -- the protocol status table -------------------------------------------------------------

# grpc's doc/statuscodes.md, written out here so that a change to the codec's table must
# change this test too (INTERNAL for an exception is ours; statuscodes.md says UNKNOWN).
STATUSCODES_MD = {
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
    "an unexpected exception in a handler": Code.INTERNAL,
}

ROW_TRIGGERS: dict[str, dict[str, Any]] = {
    "unknown service or method": {"events": body(frame(b"")), "method": "Nope"},
    "gRPC over HTTP/1.1": {"events": body(frame(b"")), "http_version": "1.1"},
    "a unary call with no message or more than one": {"events": body()},
    "a message over the size limit (also once decompressed)": {
        "events": body(frame(b"x" * (LIMIT + 1)))
    },
    "a body that ends inside a message or its prefix": {"events": body(b"\0\0")},
    "a compressed message without grpc-encoding": {"events": body(frame(b"x", True))},
    "a message that does not decompress": {
        "events": body(frame(b"x", True)),
        "headers": [("grpc-encoding", "deflate")],
    },
    "a grpc-encoding other than identity, gzip, deflate": {
        "events": body(frame(b"x")),
        "headers": [("grpc-encoding", "snappy")],
    },
    "a malformed grpc-timeout": {"events": body(frame(b"")), "headers": [("grpc-timeout", "1x")]},
    "the deadline passed": {
        "events": body(frame(b"")),
        "method": "Sleep",
        "headers": [("grpc-timeout", "20m")],
    },
    "the server is shutting down": {"events": body(frame(b"")), "refusing": "draining"},
    "an unexpected exception in a handler": {"events": body(frame(b"")), "method": "Fail"},
}


def test_the_table_is_grpcs() -> None:
    assert PROTOCOL_STATUS == STATUSCODES_MD


@pytest.mark.parametrize("condition", list(STATUSCODES_MD))
async def test_each_protocol_status_row(condition: str) -> None:
    stream = await run(**ROW_TRIGGERS[condition])
    assert stream.code == STATUSCODES_MD[condition], stream.details
    assert stream.details and "Traceback" not in stream.details


# -- what is gRPC --------------------------------------------------------------------------

CONTENT_TYPES = [
    # (what sends it, the content-type header or None for none at all, gRPC?)
    ("requests/httpx json=", "application/json", False),
    ("curl -d", "application/x-www-form-urlencoded", False),
    ("browser fetch with a string body", "text/plain;charset=UTF-8", False),
    ("tritonclient.http (sends none)", None, False),
    ("binary bodies", "application/octet-stream", False),
    ("JSON with a charset", "application/json; charset=utf-8", False),
    ("the 17th byte is ';' but the type is not grpc", "application/jsonp;x=y", False),
    ("the 17th byte is '+' but the type is not grpc", "application/grpd+proto", False),
    ("grpcio", "application/grpc", True),
    ("grpc-java, grpc-go", "application/grpc+proto", True),
    ("a parameter", "application/grpc;x=y", True),
    ("a parameter with whitespace", "application/grpc ; charset=utf-8", True),
    ("upper case", "APPLICATION/GRPC", True),
    ("mixed case subtype", "Application/gRPC+Proto", True),
    ("grpc+json", "application/grpc+json", True),
    ("grpc-web", "application/grpc-web", False),
    ("grpc-web+proto", "application/grpc-web+proto", False),
    ("grpc-web-text", "application/grpc-web-text", False),
    ("an empty subtype suffix", "application/grpc+", False),
    ("a longer type", "application/grpcx", False),
    ("empty", "", False),
]


@pytest.mark.parametrize(
    ("client", "content_type", "grpc_call"), CONTENT_TYPES, ids=[c[0] for c in CONTENT_TYPES]
)
def test_what_is_taken_for_grpc(client: str, content_type: str | None, grpc_call: bool) -> None:
    headers = [(b"host", b"x")]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
        assert is_grpc_content_type(content_type.encode()) is grpc_call
    assert is_grpc({"type": "http", "headers": headers}) is grpc_call


def test_tritonclient_http_sends_no_content_type() -> None:
    """The row above is what tritonclient.http really sends: read off the wire."""
    import socket
    import threading

    import numpy as np
    import tritonclient.http as triton

    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def answer() -> None:
        connection, _ = listener.accept()
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            seen.append(data.split(b"\r\n\r\n")[0].lower())
            connection.sendall(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                b"content-length: 13\r\n\r\n" + b'{"error":"x"}'
            )

    thread = threading.Thread(target=answer)
    thread.start()
    client = triton.InferenceServerClient(f"127.0.0.1:{listener.getsockname()[1]}")
    tensor = triton.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(Exception, match="x"):
        client.infer("m", [tensor])
    thread.join(10)
    client.close()
    listener.close()
    [head] = seen
    assert head.startswith(b"post /v2/models/m/infer") and b"content-type" not in head
