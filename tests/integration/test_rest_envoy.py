"""The V2 REST protocol through the real server under Envoy: Triton's own HTTP client
(`tritonclient.http`), unchanged, and plain HTTP, on the port that also answers gRPC."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry
from tests.helpers import EnvoyServer, server_settings

TOKEN = "s3cret"
ADMIN = {"authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The demo registry plus the tests' Doubler, shared by this module's tests (one Envoy
    start for all: each test leaves the models it does not own as it found them)."""
    from tests.helpers import seeded_registry

    reg = seeded_registry(tmp_path_factory.mktemp("rest-envoy"))
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def envoy(registry: Registry) -> Iterator[EnvoyServer]:
    """The server under Envoy with an admin token and a 1 MiB message limit."""
    settings = server_settings(
        registry.settings.database_url(), registry.settings.store, tokens=[TOKEN], max_message_mb=1
    )
    server = EnvoyServer(settings)
    yield server
    server.stop()


@pytest.fixture
def client(envoy: EnvoyServer) -> Iterator[triton.InferenceServerClient]:
    found = triton.InferenceServerClient(envoy.target)
    yield found
    found.close()


def local_forward(registry: Registry, model: str, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return registry.load_module(model)(torch.from_numpy(x)).numpy()


def request(
    envoy: EnvoyServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_triton_http_client_status_metadata_repository_and_stats(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("mynet", "1")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert client.get_model_config("mlp")["max_batch_size"] == 32
    assert not client.is_model_ready("nested")  # no other test here uses nested
    with pytest.raises(InferenceServerException, match="authorization: Bearer"):
        client.load_model("nested")
    client.load_model("nested", headers=ADMIN)
    assert client.is_model_ready("nested") and client.is_model_ready("nested", "1")
    ready = client.get_model_repository_index()
    assert ("nested", "1", "READY") in [(m["name"], m["version"], m["state"]) for m in ready]
    stats = client.get_inference_statistics("nested")["model_stats"]
    assert [(s["name"], s["version"], s["inference_count"]) for s in stats] == [("nested", "1", 0)]
    client.unload_model("nested", headers=ADMIN)
    assert not client.is_model_ready("nested")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_http_client_infer(
    client: triton.InferenceServerClient, registry: Registry, binary: bool
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = triton.InferRequestedOutput("output0", binary_data=binary)
    result = client.infer(
        "mynet", [tensor], outputs=[wanted], request_id="r-1", timeout=30_000_000, priority=1
    )
    np.testing.assert_allclose(
        result.as_numpy("output0"), local_forward(registry, "mynet", x), rtol=1e-5, atol=1e-6
    )
    response = result.get_response()
    assert (response["id"], response["model_version"]) == ("r-1", "1")
    assert ("parameters" in response["outputs"][0]) == binary


def test_triton_http_client_errors_then_serves(client: triton.InferenceServerClient) -> None:
    bad = triton.InferInput("x", [1, 3, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("mynet", [bad])
    assert err.value.status() == "400"
    assert err.value.message() == "input 'x': expected shape [-1, 3, 8, 8], got [1, 3, 8]"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert (err.value.status(), err.value.message()) == ("404", "model 'nope' not found")
    ok = triton.InferInput("x", [2, 1], "FP32")
    ok.set_data_from_numpy(np.array([[4.0], [5.0]], np.float32))
    assert client.infer("doubler", [ok]).as_numpy("output0").tolist() == [[9.0], [11.0]]


def test_plain_http_json_and_binary_infer(envoy: EnvoyServer) -> None:
    body: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [[4], [5]]}]
    }
    status, headers, content = request(
        envoy, "POST", "/v2/models/doubler/infer", json.dumps(body).encode()
    )
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(content)["outputs"][0]["data"] == [9.0, 11.0]

    x = np.array([1.0, 2.0, 3.0], np.float32)
    head = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [3, 1], "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    status, headers, content = request(
        envoy, "POST", "/v2/models/doubler/infer", head + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(head))},
    )  # fmt: skip
    assert status == 200, content
    length = int(headers["inference-header-content-length"])
    assert json.loads(content[:length])["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert np.frombuffer(content[length:], np.float32).tolist() == [3.0, 5.0, 7.0]


# What real clients send with a JSON body; none of it is gRPC (only application/grpc and
# application/grpc+<subtype> are): each gets its JSON answer, not an empty gRPC reply.
REST_CONTENT_TYPES = [
    "application/json; charset=utf-8",
    "application/json",  # requests' and httpx's json=
    "application/x-www-form-urlencoded",  # curl -d
    "text/plain;charset=UTF-8",  # a browser's fetch with a string body
    "APPLICATION/JSON",
    None,  # tritonclient.http sends none
]


@pytest.mark.parametrize("content_type", REST_CONTENT_TYPES)
def test_rest_inference_gets_json_whatever_its_content_type(
    envoy: EnvoyServer, content_type: str | None
) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [[4], [5]]}]}
    headers = {"Content-Type": content_type} if content_type else {}
    status, answer_headers, content = request(
        envoy, "POST", "/v2/models/doubler/infer", json.dumps(body).encode(), headers
    )
    assert (status, answer_headers["content-type"]) == (200, "application/json"), content
    assert json.loads(content)["outputs"][0]["data"] == [9.0, 11.0]


def test_plain_http_refusals_are_json_sentences(envoy: EnvoyServer) -> None:
    cases = [
        ("GET", "/v2/nothing", None, 404, "no such endpoint: /v2/nothing"),
        ("GET", "/v2/models/doubler/infer", None, 405, "GET is not allowed"),
        ("POST", "/v2/models/doubler/infer", b"{oops", 400, "not valid JSON"),
        ("POST", "/v2/models/doubler/infer", b"0" * (2 * 1024 * 1024), 413,
         "larger than the server's limit of 1048576 bytes"),
    ]  # fmt: skip
    for method, path, body, want, sentence in cases:
        status, headers, content = request(envoy, method, path, body)
        assert status == want, content
        assert headers["content-type"] == "application/json"
        assert sentence in json.loads(content)["error"]
    status, _, content = request(envoy, "GET", "/v2/health/ready")
    assert (status, json.loads(content)) == (200, {"ready": True})


def test_grpc_and_rest_share_the_port(envoy: EnvoyServer) -> None:
    def served_rows() -> int:
        status, _, content = request(envoy, "GET", "/v2/models/doubler/stats")
        assert status == 200
        return sum(s["inference_count"] for s in json.loads(content)["model_stats"])

    with ModelClient(envoy.target) as grpc_client:
        assert grpc_client.infer("doubler", np.array([1.0], np.float32)).tolist() == [3.0]
        before = served_rows()  # doubler is loaded now: REST sees its counters
        grpc_client.infer("doubler", np.array([[1.0], [2.0]], np.float32))
    assert served_rows() == before + 2
