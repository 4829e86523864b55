"""What a V2 REST client sends, through the real server under Envoy: a number that is not
ASCII digits gets a 400 sentence, and a 60 MB JSON body is decoded without holding up
health checks."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from moduleserve.registry.api import Registry
from tests.helpers import EnvoyServer, seeded_registry, server_settings

pytestmark = pytest.mark.timeout(300)

BIG_ROWS = 3_000_000  # float32 values print as ~20 characters: a ~60 MB body


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = seeded_registry(tmp_path_factory.mktemp("rest-trust"))
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def envoy(registry: Registry) -> Iterator[EnvoyServer]:
    """The server under Envoy, taking 128 MB bodies and 3M-row doubler batches."""
    settings = server_settings(
        registry.settings.database_url(),
        registry.settings.store,
        max_message_mb=128,
        model_batching={"doubler": {"max_batch_size": BIG_ROWS}},
    )
    server = EnvoyServer(settings)
    yield server
    server.stop()


def request(
    envoy: EnvoyServer, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_healthy(envoy: EnvoyServer) -> None:
    assert request(envoy, "GET", "/v2/health/ready") == (200, b'{"ready":true}')
    small = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [4, 5]}]}
    status, content = request(envoy, "POST", "/v2/models/doubler/infer", json.dumps(small).encode())
    assert status == 200 and json.loads(content)["outputs"][0]["data"] == [9.0, 11.0]


@pytest.mark.parametrize("value", ["²", "1¹", "٣"])
def test_a_non_ascii_number_in_a_header_is_400_with_a_sentence(
    envoy: EnvoyServer, value: str
) -> None:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32",
                                   "data": [1]}]}).encode()  # fmt: skip
    # http.client sends header values as latin-1: '²' is the byte 0xB2; '٣' goes as UTF-8.
    raw = value.encode("latin-1") if value != "٣" else value.encode()
    status, content = request(
        envoy, "POST", "/v2/models/doubler/infer", body,
        **{"Inference-Header-Content-Length": raw.decode("latin-1")},
    )  # fmt: skip
    assert status == 400, content
    shown = raw.decode("latin-1")
    assert json.loads(content) == {
        "error": "the Inference-Header-Content-Length header must be a whole number from 0 to "
        f"9223372036854775807, got {shown!r}"
    }
    assert_healthy(envoy)


def big_request(envoy: EnvoyServer) -> tuple[bytes, np.ndarray]:
    values = np.random.default_rng(0).standard_normal(BIG_ROWS).astype(np.float32)
    inputs = [{"name": "x", "shape": [BIG_ROWS, 1], "datatype": "FP32", "data": values.tolist()}]
    # The answer comes binary (12 MB, no JSON to write): what is timed is the decoding.
    parameters = {"binary_data_output": True}
    body = json.dumps({"inputs": inputs, "parameters": parameters}).encode()
    head = (
        f"POST /v2/models/doubler/infer HTTP/1.1\r\nHost: 127.0.0.1:{envoy.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body, values


def health_checks_during_a_big_decode(envoy: EnvoyServer) -> list[float]:
    """Send the big body on one connection and time health checks on another while the
    server holds the whole body (sent, not yet answered); check the big answer too."""
    message, values = big_request(envoy)
    assert len(message) > 55_000_000
    sent = threading.Event()
    answer = bytearray()

    def send_big() -> None:
        # A raw socket: sendall and recv release the GIL, so this thread does not slow
        # the health checks' client in this process.
        with socket.create_connection(("127.0.0.1", envoy.port), timeout=120) as sock:
            sock.sendall(message)
            sent.set()
            while chunk := sock.recv(1 << 20):
                answer.extend(chunk)

    big = threading.Thread(target=send_big)
    big.start()
    health = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=60)
    during: list[float] = []
    try:
        while big.is_alive():
            started = time.perf_counter()
            health.request("GET", "/v2/health/ready")
            response = health.getresponse()
            assert (response.status, response.read()) == (200, b'{"ready":true}')
            if sent.is_set() and not answer:
                during.append(time.perf_counter() - started)
            time.sleep(0.005)
    finally:
        health.close()
        big.join()
    head, _, content = bytes(answer).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    output = np.frombuffer(content[-values.nbytes :], np.float32)
    np.testing.assert_array_equal(output, values * 2 + 1)
    assert len(during) >= 5, f"only {len(during)} health checks while the body was decoded"
    return during


def test_health_answers_within_50_ms_while_a_60_mb_json_body_is_decoded(
    envoy: EnvoyServer,
) -> None:
    assert_healthy(envoy)  # doubler loaded: its load is not part of what is timed
    # Two tries: on a shared machine one check in a run can be descheduled past 50 ms. A
    # decode that holds the loop stalls a check in every try (by 500 ms and more).
    slowest = []
    for _ in range(2):
        slowest.append(max(health_checks_during_a_big_decode(envoy)))
        if slowest[-1] < 0.05:
            break
    assert min(slowest) < 0.05, f"the slowest health check of each try: {slowest} s"
    assert_healthy(envoy)
