"""HTTP plumbing for the V2 REST front end: statuses, request bodies and responses over ASGI.

No routes and no tensors here: `rest.py` routes, `rest_infer.py` converts tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import grpc
import msgspec

from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.numbers import parse_int
from moduleserve.server.status import status_for

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

JOIN_INLINE_BYTES = 1024 * 1024
"""Bodies larger than this are joined from their chunks in a worker thread."""

SEND_BYTES = 1024 * 1024
"""Largest body message sent at once: a response part is copied by the server per send."""

# Google's HTTP mapping of the canonical codes (google/rpc/code.proto), so that REST and
# gRPC clients see one decision per domain error: status.py's table picks the code.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

JSON_HEADERS = [(b"content-type", b"application/json")]

_DECODER = msgspec.json.Decoder()
ENCODER = msgspec.json.Encoder()


class HttpError(Exception):
    """A refusal about the HTTP request itself (path, method, size, encoding), not the domain."""

    def __init__(
        self, status: int, sentence: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(sentence)
        self.status, self.headers = status, list(headers)


def header(scope: Scope, name: bytes) -> str | None:
    """The last value of request header `name` (lower-case bytes), if sent."""
    found = None
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            found = value.decode("latin-1")
    return found


def request_id(scope: Scope) -> str:
    """The caller's `x-request-id` (cut short), or a fresh one, to find a failure in the log."""
    given = header(scope, b"x-request-id")
    return given[:64] if given else uuid.uuid4().hex[:16]


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when the client went away before sending it.

    Refused with 413 as soon as a declared length or the bytes received pass `limit`,
    so an oversize body is never held in memory.
    """
    declared = header(scope, b"content-length")
    if declared is not None and _content_length(declared) > limit:
        raise _too_large(limit)
    encoding = header(scope, b"content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        raise HttpError(
            415, f"content-encoding {encoding[:32]!r} is not supported; send the body uncompressed"
        )
    chunks: list[bytes] = []
    size = 0
    latest = latest_bytes = 0  # the chunks since the last join
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            latest, latest_bytes = latest + 1, latest_bytes + len(chunk)
            if latest_bytes >= JOIN_BYTES and latest > 1:
                # Thousands of small chunks held until a large body ends leave Envoy's
                # allocator holding their pages long after; blocks this large it gives back.
                chunks[-latest:] = [b"".join(chunks[-latest:])]
                latest = latest_bytes = 0
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        return chunks[0]
    if size <= JOIN_INLINE_BYTES:
        return b"".join(chunks)
    # A 60 MB join took ~40 ms: bytes.join drops the GIL, but here it would hold the loop.
    return await asyncio.to_thread(b"".join, chunks)


def _content_length(value: str) -> int:
    # HTTP's own whitespace only: str.strip() would also take '\x85' and '\u3000'.
    return parse_int(value.strip(" \t"), "the Content-Length header")


JOIN_BYTES = 4 * 1024 * 1024


def _too_large(limit: int) -> HttpError:
    return HttpError(413, f"the request body is larger than the server's limit of {limit} bytes")


def parse_json(data: bytes | memoryview, what: str = "the request body") -> Any:
    """Decoded JSON; anything undecodable is a 400 sentence, never the decoder's traceback.

    msgspec reads strict JSON (RFC 8259) several times faster than the stdlib
    (bench/rest_json.py), to the same values: exact integers of any size, correctly
    rounded floats, the last of repeated keys. What it refuses goes to the stdlib, which
    decides as it always has: it also takes NaN, Infinity and -Infinity and lone
    surrogate escapes, and its error says at which line and column the JSON broke.
    """
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        # Decoded here: json.loads would guess UTF-16 or UTF-32 from the first bytes.
        return json.loads(str(data, "utf-8"))
    except UnicodeDecodeError:
        raise InvalidInputError(f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise InvalidInputError(f"{what} nests JSON too deeply") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        limit = sys.get_int_max_str_digits()
        raise InvalidInputError(f"{what} holds an integer of more than {limit} digits") from None


def json_object(body: bytes | memoryview, what: str = "the request body") -> dict[str, Any]:
    """A JSON object from `body`; an empty body is an empty object (optional request bodies)."""
    if not body or not bytes(body).strip():
        return {}
    value = parse_json(body, what)
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def dumps(value: Any) -> bytes:
    """Compact JSON bytes (no spaces: bodies are for programs; curl users pipe to jq).

    msgspec writes NaN and infinities as null: tensors go through rest_infer's encoder,
    which keeps them. What msgspec cannot write (a lone surrogate that came in with a
    path) the stdlib writes, as it did before msgspec."""
    try:
        return ENCODER.encode(value)
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


async def send_response(
    send: Send,
    status: int,
    body: bytes | list[bytes],
    headers: list[tuple[bytes, bytes]] = JSON_HEADERS,
) -> None:
    """One complete response; `body` given in parts is sent part by part without joining,
    SEND_BYTES at most per message."""
    parts = [body] if isinstance(body, bytes) else body
    length = sum(len(p) for p in parts)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(length).encode())],
        }
    )
    # SEND_BYTES at a time, each sliced just before its send (the loop runs between sends).
    pieces = [(part, at) for part in parts for at in range(0, len(part), SEND_BYTES)]
    for index, (part, at) in enumerate(pieces):
        last = index == len(pieces) - 1
        piece = part[at : at + SEND_BYTES]  # the part itself when it is that small
        await send({"type": "http.response.body", "body": piece, "more_body": not last})
    if not pieces:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def send_json(send: Send, status: int, value: Any) -> None:
    await send_response(send, status, dumps(value))


def error_response(exc: BaseException, scope: Scope) -> tuple[int, str, list[tuple[bytes, bytes]]]:
    """The HTTP status, sentence and extra headers an exception becomes.

    Domain errors keep their sentence; anything unexpected becomes 500 with a request id,
    its traceback only in the log.
    """
    where = f"{scope.get('method', '?')} {scope.get('path', '?')}"
    if isinstance(exc, HttpError):
        logger.info("%s -> %d: %s", where, exc.status, exc)
        return exc.status, str(exc), exc.headers
    code = status_for(exc)
    if code is None:
        rid = request_id(scope)
        logger.error("internal error in %s (request id %s)", where, rid, exc_info=exc)
        return 500, f"internal error (request id {rid})", []
    status = HTTP_STATUS.get(code, 500)
    logger.info("%s -> %d (%s): %s", where, status, code.name, exc)
    return status, str(exc), []
