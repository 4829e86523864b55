"""grpc's interop test cases (grpc/doc/interop-test-descriptions.md) against our gRPC codec
under real Envoy, driven by grpcio's client: the codec serves grpc's TestService
(tests/interop_app.py) the way it serves ours. Then what grpcio never sends, in raw
HTTP/2: a deadline only the server enforces, and unary calls with zero or two messages."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests import h2_client
from tests.helpers import EnvoyServer, server_settings
from tests.interop_app import (
    ECHO_INITIAL,
    ECHO_TRAILING,
    METHODS,
    SERVICE,
    EchoStatus,
    Empty,
    Payload,
    ResponseParameters,
    SimpleRequest,
    SimpleResponse,
    StreamingInputCallRequest,
    StreamingOutputCallRequest,
)

Code = grpc.StatusCode
LIMIT = 1024 * 1024  # max_message_mb=1
SPECIAL = "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n"
# interop-test-descriptions.md's sizes
REQUEST_SIZES = [27182, 8, 1828, 45904]
RESPONSE_SIZES = [31415, 9, 2653, 58979]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyServer]:
    tmp = tmp_path_factory.mktemp("interop")
    settings = server_settings(f"sqlite:///{tmp / 'unused.db'}", tmp / "store", max_message_mb=1)
    server = EnvoyServer(settings, app="tests.interop_app:app")
    yield server
    server.stop()


@pytest.fixture
def channel(interop: EnvoyServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(interop.target) as found:
        yield found


def method(channel: grpc.Channel, name: str, service: str = SERVICE) -> Any:
    request, response, request_streaming, response_streaming = METHODS.get(
        name, (Empty, Empty, False, False)
    )
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(request_streaming, response_streaming)]
    return kind(
        f"/{service}/{name}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


class Requests:
    """A request stream the test feeds one message at a time (None ends it)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def __iter__(self) -> Requests:
        return self

    def __next__(self) -> Any:
        message = self._queue.get(timeout=60)
        if message is None:
            raise StopIteration
        return message


def streaming_request(response_size: int, payload_size: int = 0) -> Any:
    return StreamingOutputCallRequest(
        response_parameters=[ResponseParameters(size=response_size)],
        payload=Payload(body=bytes(payload_size)),
    )


def assert_serving(channel: grpc.Channel) -> None:
    assert method(channel, "EmptyCall")(Empty(), timeout=30) == Empty()


def test_empty_unary(channel: grpc.Channel) -> None:
    assert method(channel, "EmptyCall")(Empty(), timeout=30) == Empty()


def test_large_unary(channel: grpc.Channel) -> None:
    request = SimpleRequest(response_size=314159, payload=Payload(body=bytes(271828)))
    response = method(channel, "UnaryCall")(request, timeout=30)
    assert response.payload.body == bytes(314159)


def test_client_streaming(channel: grpc.Channel) -> None:
    requests = [StreamingInputCallRequest(payload=Payload(body=bytes(n))) for n in REQUEST_SIZES]
    response = method(channel, "StreamingInputCall")(iter(requests), timeout=30)
    assert response.aggregated_payload_size == 74922


def test_server_streaming(channel: grpc.Channel) -> None:
    request = StreamingOutputCallRequest(
        response_parameters=[ResponseParameters(size=n) for n in RESPONSE_SIZES]
    )
    call = method(channel, "StreamingOutputCall")(request, timeout=30)
    assert [len(r.payload.body) for r in call] == RESPONSE_SIZES
    assert call.code() == Code.OK


def test_ping_pong(channel: grpc.Channel) -> None:
    requests = Requests()
    call = method(channel, "FullDuplexCall")(requests, timeout=30)
    for response_size, payload_size in zip(RESPONSE_SIZES, REQUEST_SIZES, strict=True):
        requests.put(streaming_request(response_size, payload_size))
        assert next(call).payload.body == bytes(response_size)
    requests.put(None)
    assert list(call) == []
    assert call.code() == Code.OK


def test_empty_stream(channel: grpc.Channel) -> None:
    call = method(channel, "FullDuplexCall")(iter([]), timeout=30)
    assert list(call) == []
    assert call.code() == Code.OK


def test_cancel_after_begin(channel: grpc.Channel) -> None:
    requests = Requests()  # nothing sent
    future = method(channel, "StreamingInputCall").future(requests, timeout=30)
    time.sleep(0.2)
    assert future.cancel()
    assert future.code() == Code.CANCELLED
    requests.put(None)
    assert_serving(channel)


def test_cancel_after_first_response(channel: grpc.Channel) -> None:
    requests = Requests()
    call = method(channel, "FullDuplexCall")(requests, timeout=30)
    requests.put(streaming_request(31415, 27182))
    assert len(next(call).payload.body) == 31415
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == Code.CANCELLED
    requests.put(None)
    assert_serving(channel)


def test_timeout_on_sleeping_server(channel: grpc.Channel) -> None:
    requests = Requests()
    requests.put(StreamingOutputCallRequest(payload=Payload(body=bytes(27182))))  # no answer
    call = method(channel, "FullDuplexCall")(requests, timeout=0.001)
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    requests.put(None)
    assert_serving(channel)


@pytest.mark.parametrize("message", ["test status message", SPECIAL], ids=["plain", "special"])
def test_status_code_and_message(channel: grpc.Channel, message: str) -> None:
    """status_code_and_message, and special_status_message for SPECIAL (unary only there)."""
    status = EchoStatus(code=2, message=message)
    with pytest.raises(grpc.RpcError) as err:
        method(channel, "UnaryCall")(SimpleRequest(response_status=status), timeout=30)
    assert (err.value.code(), err.value.details()) == (Code.UNKNOWN, message)
    call = method(channel, "FullDuplexCall")(
        iter([StreamingOutputCallRequest(response_status=status)]), timeout=30
    )
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert (err.value.code(), err.value.details()) == (Code.UNKNOWN, message)


def test_custom_metadata(channel: grpc.Channel) -> None:
    metadata = [(ECHO_INITIAL, "test_initial_metadata_value"), (ECHO_TRAILING, b"\x0a\x0b" * 3)]
    request = SimpleRequest(response_size=314159, payload=Payload(body=bytes(271828)))
    response, call = method(channel, "UnaryCall").with_call(request, metadata=metadata, timeout=30)
    assert response.payload.body == bytes(314159)
    assert (ECHO_INITIAL, "test_initial_metadata_value") in call.initial_metadata()
    assert (ECHO_TRAILING, b"\x0a\x0b" * 3) in call.trailing_metadata()

    stream = method(channel, "FullDuplexCall")(
        iter([streaming_request(314159, 271828)]), metadata=metadata, timeout=30
    )
    assert [len(r.payload.body) for r in stream] == [314159]
    assert (ECHO_INITIAL, "test_initial_metadata_value") in stream.initial_metadata()
    assert (ECHO_TRAILING, b"\x0a\x0b" * 3) in stream.trailing_metadata()


@pytest.mark.parametrize(
    "service", [SERVICE, "grpc.testing.UnimplementedService"], ids=["method", "service"]
)
def test_unimplemented(channel: grpc.Channel, service: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        method(channel, "UnimplementedCall", service)(Empty(), timeout=30)
    assert err.value.code() == Code.UNIMPLEMENTED


# -- the codec's own guarantees under Envoy ---------------------------------------------------


def sized_request(size: int) -> bytes:
    """A SimpleRequest whose encoding is exactly `size` bytes."""
    for body in range(size - 8, size):
        data = SimpleRequest(payload=Payload(body=bytes(body))).SerializeToString()
        if len(data) == size:
            return data
    raise AssertionError(f"no SimpleRequest of {size} bytes")


def test_the_message_limit_is_exact(channel: grpc.Channel) -> None:
    unary = channel.unary_unary(f"/{SERVICE}/UnaryCall")  # bytes in, bytes out
    answer = SimpleResponse.FromString(unary(sized_request(LIMIT), timeout=30))
    assert answer.payload.body == b""  # response_size 0: an empty payload
    with pytest.raises(grpc.RpcError) as err:
        unary(sized_request(LIMIT + 1), timeout=30)
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert err.value.details() == f"Received message larger than max ({LIMIT + 1} vs. {LIMIT})"
    assert_serving(channel)


def test_the_server_enforces_the_deadline_itself(interop: EnvoyServer) -> None:
    """A raw HTTP/2 client that sends `grpc-timeout` but never gives up: only the server's
    own timer can end the call (the handler would sleep 10 s)."""
    sleeper = StreamingOutputCallRequest(
        response_parameters=[ResponseParameters(size=1, interval_us=10_000_000)]
    )
    started = time.monotonic()
    response = h2_client.request(
        interop.port,
        f"/{SERVICE}/StreamingOutputCall",
        h2_client.frame(sleeper.SerializeToString()),
        [("grpc-timeout", "300m")],
    )
    assert (response.grpc_status, response.grpc_message) == (4, "Deadline Exceeded")
    assert time.monotonic() - started < 8  # generous: the handler alone would take 10 s


@pytest.mark.parametrize(
    ("body", "details"),
    [
        (b"", "the request carries no message"),
        (h2_client.frame(b"") * 2, "a unary request carries one message"),
    ],
    ids=["zero", "two"],
)
def test_a_unary_call_takes_exactly_one_message(
    interop: EnvoyServer, channel: grpc.Channel, body: bytes, details: str
) -> None:
    response = h2_client.request(interop.port, f"/{SERVICE}/EmptyCall", body)
    assert (response.grpc_status, response.grpc_message) == (12, details)  # UNIMPLEMENTED
    assert_serving(channel)
