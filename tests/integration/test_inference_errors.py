"""Every bad request gets the right status and a sentence; the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moduleserve.client.oip import method_path
from moduleserve.client.pb import oip_v2_pb2 as pb
from tests.helpers import ServerThread

Code = grpc.StatusCode


def mynet_request(
    shape: list[int] | None = None,
    datatype: str = "FP32",
    name: str = "x",
    raw: bytes | None = None,
    model: str = "mynet",
    version: str = "",
) -> pb.ModelInferRequest:
    shape = shape if shape is not None else [1, 3, 8, 8]
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    itemsize = 4 if datatype in ("FP32", "INT32") else 8
    count = int(np.prod(shape)) if shape else 1
    request.raw_input_contents.append(raw if raw is not None else bytes(itemsize * count))
    return request


def with_extra_input() -> pb.ModelInferRequest:
    request = mynet_request()
    request.inputs.add(name="y", datatype="FP32", shape=[1])
    request.raw_input_contents.append(bytes(4))
    return request


def no_inputs() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="mynet")


def bytes_input() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mynet")
    request.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a")
    return request


def unknown_output() -> pb.ModelInferRequest:
    request = mynet_request()
    request.outputs.add(name="logits")
    return request


BAD_REQUESTS: list[tuple[str, Callable[[], pb.ModelInferRequest], Code, str]] = [
    (
        "unknown model",
        lambda: mynet_request(model="ghost"),
        Code.NOT_FOUND,
        "model 'ghost' not found",
    ),
    (
        "unknown version",
        lambda: mynet_request(version="7"),
        Code.NOT_FOUND,
        "model 'mynet' has no version or alias '7'",
    ),
    ("unknown alias", lambda: mynet_request(version="canary"), Code.NOT_FOUND, "'canary'"),
    (
        "bad model name",
        lambda: mynet_request(model="../etc"),
        Code.INVALID_ARGUMENT,
        "invalid model name",
    ),
    ("no model name", lambda: mynet_request(model=""), Code.INVALID_ARGUMENT, "names no model"),
    (
        "wrong rank",
        lambda: mynet_request(shape=[1, 3, 8]),
        Code.INVALID_ARGUMENT,
        "input 'x': expected shape [-1, 3, 8, 8], got [1, 3, 8]",
    ),
    (
        "wrong shape",
        lambda: mynet_request(shape=[1, 3, 8, 9]),
        Code.INVALID_ARGUMENT,
        "expected shape [-1, 3, 8, 8], got [1, 3, 8, 9]",
    ),
    (
        "wrong datatype",
        lambda: mynet_request(datatype="FP64"),
        Code.INVALID_ARGUMENT,
        "input 'x': expected datatype FP32, got FP64",
    ),
    (
        "unknown input name",
        lambda: mynet_request(name="image"),
        Code.INVALID_ARGUMENT,
        "input 'image': is not an input of model 'mynet'",
    ),
    ("extra input", with_extra_input, Code.INVALID_ARGUMENT, "input 'y'"),
    ("missing input", no_inputs, Code.INVALID_ARGUMENT, "input 'x': is missing"),
    (
        "byte count",
        lambda: mynet_request(raw=bytes(10)),
        Code.INVALID_ARGUMENT,
        "expected 768 bytes of FP32 data for shape [1, 3, 8, 8], got 10",
    ),
    (
        "empty batch",
        lambda: mynet_request(shape=[0, 3, 8, 8]),
        Code.INVALID_ARGUMENT,
        "empty batch",
    ),
    (
        "batch over max",
        lambda: mynet_request(shape=[33, 3, 8, 8]),
        Code.INVALID_ARGUMENT,
        "33 rows, more than model 'mynet''s max_batch_size 32",
    ),
    ("BYTES input", bytes_input, Code.INVALID_ARGUMENT, "BYTES is not supported"),
    (
        "unknown output",
        unknown_output,
        Code.INVALID_ARGUMENT,
        "requested output 'logits' is not an output of model 'mynet'",
    ),
]


def call_infer(
    target: str, request: pb.ModelInferRequest, **kwargs: object
) -> pb.ModelInferResponse:
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            method_path("ModelInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        return infer(request, **kwargs)


def assert_healthy_and_correct(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    request = pb.ModelInferRequest(model_name="doubler")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 1])
    request.raw_input_contents.append(np.array([4.0, 5.0], np.float32).tobytes())
    response = call_infer(target, request)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [9.0, 11.0]


@pytest.mark.parametrize(
    ("case", "make", "code", "sentence"), BAD_REQUESTS, ids=[case for case, *_ in BAD_REQUESTS]
)
def test_bad_request_gets_status_and_sentence(
    served: ServerThread,
    case: str,
    make: Callable[[], pb.ModelInferRequest],
    code: Code,
    sentence: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call_infer(served.target, make())
    assert err.value.code() == code, err.value.details()
    assert sentence in err.value.details()
    assert "Traceback" not in err.value.details()
    assert_healthy_and_correct(served.target)


def test_nan_and_inf_are_computed_not_refused(served: ServerThread) -> None:
    request = pb.ModelInferRequest(model_name="doubler")
    request.inputs.add(name="x", datatype="FP32", shape=[3, 1])
    request.raw_input_contents.append(np.array([np.nan, np.inf, -np.inf], np.float32).tobytes())
    out = np.frombuffer(call_infer(served.target, request).raw_output_contents[0], np.float32)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf
    assert_healthy_and_correct(served.target)


def test_oversized_message_is_resource_exhausted(demo_registry: object, tmp_path: object) -> None:
    from tests.helpers import server_settings

    settings = server_settings(
        demo_registry.settings.database_url(),  # type: ignore[attr-defined]
        demo_registry.settings.store,
        max_message_mb=1,
    )  # type: ignore[attr-defined]
    server = ServerThread(settings)
    try:
        request = mynet_request(shape=[32, 3, 8, 8])
        request.raw_input_contents[0] = bytes(2 * 1024 * 1024)
        with pytest.raises(grpc.RpcError) as err:
            call_infer(server.target, request)
        assert err.value.code() == Code.RESOURCE_EXHAUSTED
        assert_healthy_and_correct(server.target)
    finally:
        server.stop()


DEADLINE_SENTENCE = "deadline passed before the request was computed"


def with_timeout_us(request: pb.ModelInferRequest, microseconds: int) -> pb.ModelInferRequest:
    """Triton's `timeout` parameter: a deadline only the server knows (a gRPC deadline this
    short would expire in the client and never reach the server)."""
    request.parameters["timeout"].int64_param = microseconds
    return request


def test_expired_deadline_is_deadline_exceeded(served_inproc: ServerThread) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call_infer(served_inproc.target, with_timeout_us(mynet_request(), 1))
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    assert DEADLINE_SENTENCE in err.value.details()  # the server's sentence, not the client's
    stats = served_inproc.app.cache.peek("mynet").batcher.stats()  # type: ignore[union-attr]
    assert (stats.rejected, stats.rows) == (1, 0)
    assert_healthy_and_correct(served_inproc.target)


def test_deadline_passing_in_the_queue_is_never_computed(
    demo_registry: object, served_inproc: ServerThread
) -> None:
    import threading
    import time
    from typing import Any

    from moduleserve.registry.classes import parse_input_spec
    from tests.models import SlowNet

    registry: Any = demo_registry
    registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 0.3}, [parse_input_spec("x:float32:-1,2")]
    )
    registry.push("slow", SlowNet(0.3).state_dict(), class_name="Slow")

    def slow_request() -> pb.ModelInferRequest:
        return mynet_request(shape=[1, 2], model="slow")

    call_infer(served_inproc.target, slow_request())  # loaded, warm
    batcher = served_inproc.app.cache.peek("slow").batcher  # type: ignore[union-attr]
    busy = threading.Thread(target=call_infer, args=(served_inproc.target, slow_request()))
    busy.start()
    give_up = time.monotonic() + 10
    while not (batcher.stats().requests == 2 and batcher.stats().queued == 0):
        assert time.monotonic() < give_up, "the first request never reached the model"
        time.sleep(0.005)  # until the worker took it: a 0.3 s forward pass is running
    with pytest.raises(grpc.RpcError) as err:
        call_infer(served_inproc.target, with_timeout_us(slow_request(), 100_000))
    busy.join(timeout=10)
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    assert DEADLINE_SENTENCE in err.value.details()
    stats = batcher.stats()
    assert stats.rows == 2 and stats.fail + stats.rejected == 1  # expired, never computed
    assert_healthy_and_correct(served_inproc.target)
