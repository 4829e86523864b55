"""The V2 REST front end driven as an ASGI callable over a real DataPlane and demo registry:
every route, the binary tensor extension both ways, and each error class as status + sentence."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.server.dataplane import DataPlane
from moduleserve.server.engine.cache import ModelCache
from moduleserve.server.engine.devices import DeviceExecutors, resolve_device
from moduleserve.server.frontends.rest import RestApp
from moduleserve.server.security import Authorizer
from tests.helpers import server_settings
from tests.models import NanHater, SlowNet

pytestmark = pytest.mark.timeout(120)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: RestApp,
    method: str,
    path: str,
    body: bytes | dict[str, Any] = b"",
    headers: Sequence[tuple[str, str]] = (),
    chunk: int | None = None,
) -> Answer:
    """One request through the ASGI callable, its body in `chunk`-byte messages."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    size = chunk or max(len(data), 1)
    pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        # Header values as HTTP carries them (and http.client sends them): latin-1 bytes.
        "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers],
    }
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and not sent[-1]["more_body"]
    start_headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    content = b"".join(m["body"] for m in sent[1:])
    assert int(start_headers["content-length"]) == len(content)
    return Answer(sent[0]["status"], start_headers, content)


@asynccontextmanager
async def rest_app(registry: Registry, **overrides: Any) -> AsyncIterator[RestApp]:
    """A RestApp over a DataPlane built the way server/app.py's App builds it."""
    max_body = overrides.pop("max_body_bytes", 64 * 1024 * 1024)
    settings: Any = server_settings(
        registry.settings.database_url(), registry.settings.store, **overrides
    )
    reg = Registry(settings)
    executors = DeviceExecutors()
    cache = ModelCache(reg, settings, executors, resolve_device(settings.device))
    plane = DataPlane(cache, reg)
    cache.start()
    plane.ready = True
    try:
        auth = Authorizer(settings.tokens, settings.read_tokens)
        yield RestApp(plane, auth, max_body_bytes=max_body)
    finally:
        plane.ready = False
        await cache.close()
        executors.shutdown()
        reg.close()


@pytest.fixture
async def app(demo_registry: Registry) -> AsyncIterator[RestApp]:
    async with rest_app(demo_registry) as found:
        yield found


def doubler_body(values: Any = ((4.0,), (5.0,)), shape: Sequence[int] = (2, 1)) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32", "data": values}]}


async def assert_still_serving(app: RestApp) -> None:
    answer = await call(app, "POST", "/v2/models/doubler/infer", doubler_body())
    assert answer.status == 200, answer.body
    assert answer.json()["outputs"][0]["data"] == [9.0, 11.0]


def binary_body(head: dict[str, Any], *parts: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    header = json.dumps(head).encode()
    return header + b"".join(parts), [("Inference-Header-Content-Length", str(len(header)))]


def split_binary(answer: Answer) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON header and each binary output's bytes, by name."""
    length = int(answer.headers["inference-header-content-length"])
    head = json.loads(answer.body[:length])
    found, offset = {}, length
    for out in head["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            found[out["name"]] = answer.body[offset : offset + size]
            offset += size
    assert offset == len(answer.body)
    return head, found


# --- health and metadata ---


async def test_health_and_server_metadata(app: RestApp) -> None:
    assert (await call(app, "GET", "/v2/health/live")).json() == {"live": True}
    ready = await call(app, "GET", "/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})
    app.plane.ready = False  # as while starting or draining
    assert (await call(app, "GET", "/v2/health/ready")).status == 400
    app.plane.ready = True
    meta = (await call(app, "GET", "/v2")).json()
    assert meta["name"] == "moduleserve" and "binary_tensor_data" in meta["extensions"]


async def test_model_metadata_and_config(app: RestApp) -> None:
    for path in ("/v2/models/mynet", "/v2/models/mynet/versions/1"):
        meta = (await call(app, "GET", path)).json()
        assert meta == {
            "name": "mynet",
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
            "outputs": [{"name": "output0", "datatype": "FP32", "shape": [-1, 10]}],
        }
    config = (await call(app, "GET", "/v2/models/mlp/config")).json()
    assert config["max_batch_size"] == 32 and config["backend"] == "moduleserve"
    (given,) = config["input"]
    assert (given["name"], given["data_type"], given["dims"]) == ("x", "TYPE_FP32", [784])
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["parameters"]["version"] == {"string_value": "1"}


async def test_repository_load_ready_stats_unload(app: RestApp) -> None:
    index = (await call(app, "POST", "/v2/repository/index")).json()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        (name, "1", "UNAVAILABLE") for name in ("doubler", "mlp", "mynet", "nested")
    }
    assert (await call(app, "GET", "/v2/models/mynet/ready")).status == 400
    load = "/v2/repository/models/mynet/load"
    answer = await call(app, "POST", load, {"parameters": {"version": 1}})
    assert (answer.status, answer.body) == (200, b"")
    answer = await call(app, "GET", "/v2/models/mynet/versions/1/ready")
    assert (answer.status, answer.json()) == (200, {"name": "mynet", "ready": True})
    assert (await call(app, "POST", load)).status == 200  # the default version, by its ref ""
    assert (await call(app, "GET", "/v2/models/mynet/ready")).status == 200
    ready = (await call(app, "POST", "/v2/repository/index", {"ready": True})).json()
    assert ready == [{"name": "mynet", "version": "1", "state": "READY", "reason": ""}]

    await assert_still_serving(app)  # doubler loads lazily: two models have stats now
    everything = (await call(app, "GET", "/v2/models/stats")).json()["model_stats"]
    assert sorted(s["name"] for s in everything) == ["doubler", "mynet"]
    stats = (await call(app, "GET", "/v2/models/doubler/versions/1/stats")).json()["model_stats"]
    assert stats[0]["inference_count"] == 2 and stats[0]["execution_count"] == 1
    assert stats[0]["inference_stats"]["success"]["count"] == 1
    assert stats[0]["inference_stats"]["fail"] == {"count": 0, "ns": 0}  # zeros are present
    assert stats[0]["batch_stats"][0]["batch_size"] == 2
    mynet = (await call(app, "GET", "/v2/models/mynet/stats")).json()["model_stats"]
    assert mynet[0]["inference_count"] == 0

    assert (await call(app, "POST", "/v2/repository/models/mynet/unload")).status == 200
    assert (await call(app, "GET", "/v2/models/mynet/ready")).status == 400


# --- inference ---


async def test_infer_json_flat_and_nested_with_id(app: RestApp) -> None:
    for values in ([4.0, 5.0], [[4.0], [5.0]], [4, 5]):
        body = {**doubler_body(values), "id": "req-7", "outputs": [{"name": "output0"}]}
        answer = await call(app, "POST", "/v2/models/doubler/versions/1/infer", body)
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {
            "model_name": "doubler",
            "model_version": "1",
            "id": "req-7",
            "outputs": [
                {"name": "output0", "datatype": "FP32", "shape": [2, 1], "data": [9.0, 11.0]}
            ],
        }


async def test_infer_binary_both_ways_matches_local_forward(
    app: RestApp, demo_registry: Registry
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    head = {
        "inputs": [
            {"name": "x", "shape": [3, 3, 8, 8], "datatype": "FP32",
             "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    body, headers = binary_body(head, x.tobytes())
    answer = await call(app, "POST", "/v2/models/mynet/infer", body, headers, chunk=1000)
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "application/octet-stream"
    out, raw = split_binary(answer)
    assert out["outputs"][0]["shape"] == [3, 10]
    with torch.inference_mode():
        expected = demo_registry.load_module("mynet")(torch.from_numpy(x)).numpy()
    got = np.frombuffer(raw["output0"], np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


async def test_binary_data_output_and_per_output_override(app: RestApp) -> None:
    body = {**doubler_body(), "parameters": {"binary_data_output": True}}
    head, raw = split_binary(await call(app, "POST", "/v2/models/doubler/infer", body))
    assert np.frombuffer(raw["output0"], np.float32).tolist() == [9.0, 11.0]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    body["outputs"] = [{"name": "output0", "parameters": {"binary_data": False}}]
    answer = await call(app, "POST", "/v2/models/doubler/infer", body)
    assert answer.json()["outputs"][0]["data"] == [9.0, 11.0]


# --- errors: status + sentence, and the server keeps serving ---

BAD = [
    ("unknown path", "GET", "/v2/nothing", b"", 404, "no such endpoint: /v2/nothing"),
    ("not v2", "GET", "/", b"", 404, "no such endpoint"),
    ("wrong method", "GET", "/v2/models/doubler/infer", b"", 405, "GET is not allowed"),
    ("unknown model", "GET", "/v2/models/nope", b"", 404, "'nope'"),
    ("unknown model infer", "POST", "/v2/models/nope/infer", doubler_body(), 404, "'nope'"),
    ("bad json", "POST", "/v2/models/doubler/infer", b"{not json", 400,
     "the request body is not valid JSON (Expecting property name enclosed in double quotes "
     "at line 1 column 2)"),
    ("deep json", "POST", "/v2/models/doubler/infer", b"[" * 100_000, 400,
     "the request body nests JSON too deeply"),
    ("deep big json", "POST", "/v2/models/doubler/infer", b'{"a":' * 100_000, 400,
     "the request body nests JSON too deeply"),
    ("not utf-8", "POST", "/v2/models/doubler/infer", b"\xff\xfe", 400, "not UTF-8"),
    ("json array", "POST", "/v2/models/doubler/infer", b"[1]", 400, "must be a JSON object"),
    ("no inputs", "POST", "/v2/models/doubler/infer", b"{}", 400, "needs an 'inputs' array"),
    ("count", "POST", "/v2/models/doubler/infer", doubler_body([1.0]), 400,
     "input 'x': expected 2 FP32 values for shape [2, 1], got 1"),
    ("shape", "POST", "/v2/models/doubler/infer", doubler_body([1.0, 2.0], (1, 2)), 400,
     "input 'x': expected shape [-1, 1], got [1, 2]"),
    ("bytes", "POST", "/v2/models/doubler/infer",
     {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, 400,
     "datatype BYTES is not supported by this model"),
    ("strings", "POST", "/v2/models/doubler/infer", doubler_body(["a", "b"]), 400,
     "FP32 data must be numbers"),
    ("timeout type", "POST", "/v2/models/doubler/infer",
     {**doubler_body(), "parameters": {"timeout": "soon"}}, 400,
     "parameter 'timeout' must be a whole number from 0 to 18446744073709551615, got 'soon'"),
    ("output", "POST", "/v2/models/doubler/infer",
     {**doubler_body(), "outputs": [{"name": "nope"}]}, 400,
     "requested output 'nope' is not an output of model 'doubler'"),
    ("bad version", "GET", "/v2/models/doubler/versions/99", b"", 404,
     "model 'doubler' has no version or alias '99'"),
    ("index ready", "POST", "/v2/repository/index", b'{"ready": 1}', 400,
     "'ready' must be true or false"),
    ("load params", "POST", "/v2/repository/models/doubler/load", b'{"parameters": 3}', 400,
     "'parameters' must be a JSON object"),
    ("unload unknown", "POST", "/v2/repository/models/nope/unload", b"", 404, "'nope'"),
    ("lone surrogate id", "POST", "/v2/models/doubler/infer",
     {**doubler_body(), "id": "\ud800"}, 400,
     "the request's 'id' must be text without lone surrogates"),
    ("digits past int()", "POST", "/v2/models/doubler/infer",
     b'{"inputs": [], "id": ' + b"9" * 5000 + b"}", 400,
     "the request body holds an integer of more than 4300 digits"),
    ("unicode digit version", "GET", "/v2/models/doubler/versions/٣", b"", 400,
     "invalid version"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "status", "sentence"), BAD, ids=[b[0] for b in BAD]
)
async def test_bad_request_gets_status_and_sentence(
    app: RestApp, case: str, method: str, path: str, body: Any, status: int, sentence: str
) -> None:
    answer = await call(app, method, path, body)
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/json"
    assert sentence in answer.json()["error"]
    assert "Traceback" not in answer.json()["error"]
    if status == 405:
        assert answer.headers["allow"] == "POST"
    await assert_still_serving(app)


async def test_oversize_body_is_413_declared_or_streamed(demo_registry: Registry) -> None:
    async with rest_app(demo_registry, max_body_bytes=1000) as app:
        body = json.dumps(doubler_body([0.0] * 400, (400, 1))).encode()
        declared = await call(app, "POST", "/v2/models/doubler/infer", body,
                              [("content-length", str(len(body)))])  # fmt: skip
        streamed = await call(app, "POST", "/v2/models/doubler/infer", body, chunk=300)
        for answer in (declared, streamed):
            assert answer.status == 413
            assert answer.json()["error"] == (
                "the request body is larger than the server's limit of 1000 bytes"
            )
        await assert_still_serving(app)


@pytest.mark.parametrize("raw", [b"\xb2", b"1\xb9", "٣".encode(), b"1_0", b" 1 2"])
async def test_a_content_length_that_is_not_ascii_digits_is_400(app: RestApp, raw: bytes) -> None:
    body = json.dumps(doubler_body()).encode()
    answer = await call(app, "POST", "/v2/models/doubler/infer", body,
                        [("content-length", raw.decode("latin-1"))])  # fmt: skip
    assert answer.status == 400, answer.body
    assert answer.json()["error"].startswith("the Content-Length header must be a whole number")
    await assert_still_serving(app)


async def test_compressed_body_is_415(app: RestApp) -> None:
    answer = await call(app, "POST", "/v2/models/doubler/infer", b"\x1f\x8b",
                        [("content-encoding", "gzip")])  # fmt: skip
    assert answer.status == 415 and "send the body uncompressed" in answer.json()["error"]


async def test_a_client_that_leaves_gets_no_answer(app: RestApp) -> None:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/doubler/infer", "headers": []}
    await app(scope, receive, send)
    assert sent == []
    await assert_still_serving(app)


async def test_bearer_token_for_load_and_unload(demo_registry: Registry) -> None:
    async with rest_app(demo_registry, tokens=["s3cret"]) as app:
        load = "/v2/repository/models/doubler/load"
        missing = await call(app, "POST", load)
        assert missing.status == 401 and "authorization: Bearer" in missing.json()["error"]
        wrong = await call(app, "POST", load, headers=[("authorization", "Bearer nope")])
        assert wrong.status == 403 and "not one of the server's tokens" in wrong.json()["error"]
        good = [("authorization", "Bearer s3cret")]
        assert (await call(app, "POST", load, headers=good)).status == 200
        unload = "/v2/repository/models/doubler/unload"
        assert (await call(app, "POST", unload)).status == 401
        assert (await call(app, "POST", unload, headers=good)).status == 200


async def test_expired_deadline_is_504(app: RestApp) -> None:
    body = {**doubler_body(), "parameters": {"timeout": 1}}  # one microsecond
    answer = await call(app, "POST", "/v2/models/doubler/infer", body)
    assert answer.status == 504
    assert "deadline passed before the request was computed" in answer.json()["error"]
    await assert_still_serving(app)


def register(registry: Registry, name: str, cls: type[torch.nn.Module], **kwargs: Any) -> None:
    path = f"tests.models:{cls.__name__}"
    registry.classes.register(name, path, kwargs, [parse_input_spec("x:float32:-1,2")])
    registry.push(name.lower(), cls(**kwargs).state_dict(), class_name=name)


async def test_full_queue_is_429(demo_registry: Registry) -> None:
    register(demo_registry, "Slow", SlowNet, delay_s=0.3)
    batching = {"slow": {"max_batch_size": 1, "max_queue_size": 1}}
    async with rest_app(demo_registry, model_batching=batching) as app:
        assert (await call(app, "POST", "/v2/repository/models/slow/load")).status == 200
        body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        answers = await asyncio.gather(
            *(call(app, "POST", "/v2/models/slow/infer", body) for _ in range(4))
        )
        refused = [a for a in answers if a.status == 429]
        assert refused and "queue is full" in refused[0].json()["error"]
        assert all(a.status in (200, 429) for a in answers)
        await assert_still_serving(app)


async def test_unexpected_failure_is_500_with_request_id(
    demo_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    register(demo_registry, "NanHater", NanHater)
    async with rest_app(demo_registry) as app:
        body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        assert (await call(app, "POST", "/v2/models/nanhater/infer", body)).status == 200
        body["inputs"][0]["data"] = [float("nan"), 1.0]
        with caplog.at_level(logging.ERROR):
            answer = await call(app, "POST", "/v2/models/nanhater/infer", body,
                                [("x-request-id", "abc123")])  # fmt: skip
        assert answer.status == 500
        assert answer.json() == {"error": "internal error (request id abc123)"}
        assert "NaN reached a layer" in caplog.text  # the exception is in the log only
        await assert_still_serving(app)
