"""A raw HTTP/2 client (h2) for requests grpcio never sends: two messages on a unary call, a
body cut inside a message, a `grpc-timeout` with no client-side deadline behind it."""

from __future__ import annotations

import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


def frame(message: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message."""
    return struct.pack(">?I", compressed, len(message)) + message


@dataclass
class Response:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None  # the RST_STREAM error code, when the server reset the stream

    @property
    def grpc_status(self) -> int | None:
        found = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if found is None else int(found)

    @property
    def grpc_message(self) -> str:
        found = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return urllib.parse.unquote(found)


def request(
    port: int,
    path: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    end_stream: bool = True,
    timeout: float = 30.0,
) -> Response:
    """One POST on a fresh connection (content-type application/grpc unless `headers` name
    one); waits for the stream's end (or `timeout`, then fails). With `end_stream=False`
    the body stays open, as a client still sending."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    response = Response()
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())
        stream = connection.get_next_available_stream_id()
        given = headers or []
        if not any(key == "content-type" for key, _ in given):
            given = [("content-type", "application/grpc"), *given]
        connection.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{port}"),
                (":path", path),
                ("te", "trailers"),
                *given,
            ],
            end_stream=not body and end_stream,
        )
        sock.sendall(connection.data_to_send())
        unsent = memoryview(body)
        ended = False
        while not ended:
            while unsent:  # as much of the body as flow control lets through
                size = min(
                    len(unsent),
                    connection.local_flow_control_window(stream),
                    connection.max_outbound_frame_size,
                )
                if size <= 0:
                    break
                connection.send_data(stream, unsent[:size].tobytes(), end_stream=False)
                unsent = unsent[size:]
                if not unsent and end_stream:
                    connection.end_stream(stream)
            sock.sendall(connection.data_to_send())
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"no end of stream within {timeout} s") from None
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    response.headers = _text(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    response.data += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    response.trailers = _text(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    response.reset = event.error_code
                    ended = True
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(connection.data_to_send())
    return response


def _text(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in headers
    }
