"""What a V2 REST client sends, through the real server under Envoy: a number that is not
ASCII digits gets a 400 sentence."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from moduleserve.registry.api import Registry
from tests.helpers import EnvoyServer, seeded_registry, server_settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = seeded_registry(tmp_path_factory.mktemp("rest-trust"))
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def envoy(registry: Registry) -> Iterator[EnvoyServer]:
    settings = server_settings(registry.settings.database_url(), registry.settings.store)
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
