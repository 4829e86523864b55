"""What each front end must do on the wire besides answering: deadlines, cancellation,
unknown methods, size limits, tokens, TLS and metrics, the same under grpc.aio and Envoy."""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moduleserve.client.oip import method_path
from moduleserve.client.pb import moduleserve_v1_pb2 as v1
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from tests import h2_client
from tests.helpers import EnvoyServer, ServerThread, server_settings
from tests.models import SlowNet

FRONT_ENDS = ["grpc", "envoy"]
Code = grpc.StatusCode


def start(frontend: str, registry: Registry, **overrides: Any) -> ServerThread | EnvoyServer:
    settings = server_settings(
        registry.settings.database_url(), registry.settings.store, **overrides
    )
    return ServerThread(settings) if frontend == "grpc" else EnvoyServer(settings)


@pytest.fixture
def slow_registry(demo_registry: Registry) -> Registry:
    """The demo registry plus `slow`, whose forward pass sleeps 0.5 s."""
    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 0.5}, [parse_input_spec("x:float32:-1,2")]
    )
    demo_registry.push("slow", SlowNet(0.5).state_dict(), class_name="Slow")
    return demo_registry


@pytest.fixture(params=FRONT_ENDS)
def slow_server(request: pytest.FixtureRequest, slow_registry: Registry) -> Iterator[Any]:
    server = start(request.param, slow_registry, load=["slow"])
    yield server
    server.stop()


def slow_request() -> bytes:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    return request.SerializeToString()


def infer_rows(channel: grpc.Channel, model: str) -> int:
    """Rows the model computed so far (Triton's inference_count)."""
    stats = channel.unary_unary(
        method_path("ModelStatistics"), response_deserializer=pb.ModelStatisticsResponse.FromString
    )(pb.ModelStatisticsRequest(name=model).SerializeToString())
    return sum(s.inference_count for s in stats.model_stats)


def assert_serving(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        ready = channel.unary_unary(
            method_path("ServerReady"), response_deserializer=pb.ServerReadyResponse.FromString
        )(pb.ServerReadyRequest().SerializeToString())
        assert ready.ready


def test_a_grpc_deadline_ends_a_slow_call(slow_server: Any) -> None:
    with grpc.insecure_channel(slow_server.target) as channel:
        infer = channel.unary_unary(method_path("ModelInfer"))
        with pytest.raises(grpc.RpcError) as err:
            infer(slow_request(), timeout=0.2)
        assert err.value.code() == Code.DEADLINE_EXCEEDED
        assert len(pb.ModelInferResponse.FromString(infer(slow_request(), timeout=30)).outputs)
    assert_serving(slow_server.target)


def test_a_cancelled_queued_request_is_never_computed(slow_server: Any) -> None:
    with grpc.insecure_channel(slow_server.target) as channel:
        infer = channel.unary_unary(method_path("ModelInfer"))
        rows_before = infer_rows(channel, "slow")
        running = infer.future(slow_request(), timeout=30)
        time.sleep(0.15)  # the first request is computing (0.5 s) when the second queues
        queued = infer.future(slow_request(), timeout=30)
        time.sleep(0.1)
        assert queued.cancel()
        running.result()
        time.sleep(0.6)  # past the next batch the cancelled request would have made
        assert infer_rows(channel, "slow") == rows_before + 1
    assert_serving(slow_server.target)


def test_the_server_itself_ends_a_call_at_its_deadline(slow_server: Any) -> None:
    """A raw HTTP/2 client sends `grpc-timeout` and never gives up on its own (grpcio would
    cancel at its deadline, hiding whether the server enforces it): the server must end
    the call with DEADLINE_EXCEEDED while the forward pass (0.5 s) still runs."""
    started = time.monotonic()
    response = h2_client.request(
        slow_server.port,
        method_path("ModelInfer"),
        h2_client.frame(slow_request()),
        [("grpc-timeout", "150m")],
    )
    assert response.grpc_status == Code.DEADLINE_EXCEEDED.value[0], response
    assert time.monotonic() - started < 5  # generous: the point is that it ends at all
    assert_serving(slow_server.target)


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_the_message_limit_is_exact(frontend: str, demo_registry: Registry) -> None:
    """A message of exactly --max-message-mb passes the size check (and is refused for
    what it holds); one byte more is RESOURCE_EXHAUSTED."""
    server = start(frontend, demo_registry, max_message_mb=1)
    limit = 1024 * 1024
    options = [("grpc.max_send_message_length", 2 * limit)]
    try:
        with grpc.insecure_channel(server.target, options=options) as channel:
            infer = channel.unary_unary(method_path("ModelInfer"))
            with pytest.raises(grpc.RpcError) as err:
                infer(bytes(limit), timeout=30)  # zeros: not a valid protobuf message
            assert err.value.code() == Code.INVALID_ARGUMENT, err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                infer(bytes(limit + 1), timeout=30)
            assert err.value.code() == Code.RESOURCE_EXHAUSTED, err.value.details()
        assert_serving(server.target)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("body", "details"),
    [
        (b"", "the request carries no message"),
        (h2_client.frame(b"") * 2, "a unary request carries one message"),
    ],
    ids=["zero", "two"],
)
def test_a_unary_call_takes_exactly_one_message_under_envoy(
    demo_registry: Registry, body: bytes, details: str
) -> None:
    server = start("envoy", demo_registry)
    try:
        response = h2_client.request(server.port, method_path("ServerLive"), body)
        assert (response.grpc_status, response.grpc_message) == (
            Code.UNIMPLEMENTED.value[0],
            details,
        )
        assert_serving(server.target)
    finally:
        server.stop()


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_an_unknown_method_is_unimplemented(frontend: str, demo_registry: Registry) -> None:
    server = start(frontend, demo_registry)
    try:
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")(b"")
            assert err.value.code() == Code.UNIMPLEMENTED
        assert_serving(server.target)
    finally:
        server.stop()


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_mutating_calls_need_a_token(frontend: str, demo_registry: Registry) -> None:
    server = start(frontend, demo_registry, tokens=["s3cret"])
    load = pb.RepositoryModelLoadRequest(model_name="mynet").SerializeToString()
    try:
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(method_path("RepositoryModelLoad"))
            with pytest.raises(grpc.RpcError) as err:
                call(load)
            assert err.value.code() == Code.UNAUTHENTICATED
            assert (
                "send an 'authorization: Bearer <token>' header (gRPC metadata)"
                in err.value.details()
            )
            with pytest.raises(grpc.RpcError) as err:
                call(load, metadata=[("authorization", "Bearer wrong")])
            assert err.value.code() == Code.PERMISSION_DENIED
            call(load, metadata=[("authorization", "Bearer s3cret")])
        assert_serving(server.target)
    finally:
        server.stop()


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_tls(frontend: str, demo_registry: Registry, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    server = start(frontend, demo_registry, tls_cert=cert, tls_key=key)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.target, credentials) as channel:
            live = channel.unary_unary(
                method_path("ServerLive"), response_deserializer=pb.ServerLiveResponse.FromString
            )(pb.ServerLiveRequest().SerializeToString(), timeout=30)
            assert live.live
        plaintext = grpc.insecure_channel(server.target)  # not served on a TLS port
        with plaintext, pytest.raises(grpc.RpcError):
            plaintext.unary_unary(method_path("ServerLive"))(b"", timeout=5)
    finally:
        server.stop()


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_metrics_count_requests(frontend: str, demo_registry: Registry) -> None:
    import urllib.request

    server = start(frontend, demo_registry, metrics_port=0)
    try:
        request = pb.ModelInferRequest(model_name="mynet")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 3, 8, 8])
        request.raw_input_contents.append(bytes(3 * 8 * 8 * 4))
        with grpc.insecure_channel(server.target) as channel:
            infer = channel.unary_unary(method_path("ModelInfer"))
            for _ in range(3):
                infer(request.SerializeToString())
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        [line] = [
            line
            for line in text.splitlines()
            if line.startswith("moduleserve_requests_total{")
            and 'model="mynet"' in line
            and 'outcome="success"' in line
        ]
        assert float(line.rsplit(" ", 1)[1]) == 3
    finally:
        server.stop()


def test_concurrent_calls_from_many_threads_all_answer(slow_registry: Registry) -> None:
    """Envoy multiplexes streams over one connection: many in flight at once, each answered
    with its own result (the rows are distinct, so a mix-up would show)."""
    server = start("envoy", slow_registry, load=["mynet"])
    try:
        with grpc.insecure_channel(server.target) as channel:
            infer = channel.unary_unary(
                method_path("ModelInfer"), response_deserializer=pb.ModelInferResponse.FromString
            )
            results: dict[int, float] = {}

            def call(i: int) -> None:
                request = pb.ModelInferRequest(model_name="doubler")
                request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
                request.raw_input_contents.append(np.array([i], np.float32).tobytes())
                response = infer(request.SerializeToString(), timeout=60)
                results[i] = float(np.frombuffer(response.raw_output_contents[0], np.float32)[0])

            threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert results == {i: 2.0 * i + 1 for i in range(64)}
    finally:
        server.stop()


@pytest.mark.parametrize("compute", ["auto", "thread"])
def test_model_config_says_where_forward_passes_run(compute: str, demo_registry: Registry) -> None:
    server = start("grpc", demo_registry, load=["doubler"], compute=compute)
    try:
        with grpc.insecure_channel(server.target) as channel:
            config = channel.unary_unary(
                method_path("ModelConfig"),
                response_deserializer=pb.ModelConfigResponse.FromString,
            )(pb.ModelConfigRequest(name="doubler").SerializeToString()).config
            unloaded = channel.unary_unary(
                method_path("ModelConfig"),
                response_deserializer=pb.ModelConfigResponse.FromString,
            )(pb.ModelConfigRequest(name="mlp").SerializeToString()).config
        params = config.parameters
        if compute == "thread":
            assert params["compute"].string_value == "thread"
            assert "forward_ms_at_max_batch" not in params
        else:  # measured at load: which side of the threshold depends on this machine
            assert params["compute"].string_value in ("inline", "thread")
            assert float(params["forward_ms_at_max_batch"].string_value) > 0
        assert "compute" not in unloaded.parameters
    finally:
        server.stop()


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_compressed_calls_are_answered(
    frontend: str, compression: grpc.Compression, demo_registry: Registry
) -> None:
    server = start(frontend, demo_registry)
    # 768 zero bytes compress well (a client sends a message uncompressed when
    # compressing would not make it smaller).
    request = pb.ModelInferRequest(model_name="mynet")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(bytes(3 * 8 * 8 * 4))
    try:
        answers = []
        for channel_compression in (compression, grpc.Compression.NoCompression):
            with grpc.insecure_channel(server.target, compression=channel_compression) as channel:
                infer = channel.unary_unary(
                    method_path("ModelInfer"),
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                answers.append(infer(request.SerializeToString(), timeout=30))
        compressed, plain = answers
        assert compressed.raw_output_contents == plain.raw_output_contents
        assert len(compressed.raw_output_contents[0]) == 40
        assert_serving(server.target)
    finally:
        server.stop()


def _blocked_upload(channel: grpc.Channel, release: threading.Event, timeout: float) -> Any:
    """An UploadDataset call whose client sends its header, then nothing until `release`."""

    def requests() -> Any:
        header = v1.UploadDatasetHeader(
            name="blocked", tensors=[v1.DatasetTensor(name="inputs", dtype="float32", shape=[4])]
        )
        yield v1.UploadDatasetRequest(header=header)
        release.wait(30)

    upload = channel.stream_unary(
        "/moduleserve.v1.Datasets/UploadDataset",
        request_serializer=v1.UploadDatasetRequest.SerializeToString,
    )
    return upload.future(requests(), timeout=timeout)


def test_what_clients_cause_leaves_no_traceback_in_the_envoy_log(
    slow_registry: Registry, capfd: pytest.CaptureFixture[str]
) -> None:
    """Clients that cancel or time out (an upload, a queued inference), gRPC-Web and REST
    requests to unknown paths: each gets its status and the server's log (the
    application's lines, which the launcher's stderr carries, and Envoy's own file) has no
    traceback, only one INFO line for a client that went away."""
    server = start("envoy", slow_registry, load=["slow"])
    try:
        release = threading.Event()
        with grpc.insecure_channel(server.target) as channel:
            cancelled = _blocked_upload(channel, release, timeout=30)
            timed_out = _blocked_upload(channel, release, timeout=0.5)
            time.sleep(1.0)  # both are inside UploadDataset, waiting for their next chunk
            assert cancelled.cancel()
            with pytest.raises(grpc.RpcError) as err:
                timed_out.result()
            assert err.value.code() == Code.DEADLINE_EXCEEDED
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(method_path("ModelInfer"))(slow_request(), timeout=0.2)
            assert err.value.code() == Code.DEADLINE_EXCEEDED
            release.set()
        # An upload whose client never gives up by itself: only the server's deadline ends
        # it, while the codec waits for the next chunk.
        header = v1.UploadDatasetHeader(
            name="raw", tensors=[v1.DatasetTensor(name="inputs", dtype="float32", shape=[4])]
        )
        stalled = h2_client.request(
            server.port,
            "/moduleserve.v1.Datasets/UploadDataset",
            h2_client.frame(v1.UploadDatasetRequest(header=header).SerializeToString()),
            [("grpc-timeout", "300m")],
            end_stream=False,
        )
        assert stalled.grpc_status == Code.DEADLINE_EXCEEDED.value[0], stalled
        for version in ("1.1", "2"):  # gRPC-Web is not spoken: a REST 404, nothing more
            if version == "2":
                h2 = h2_client.request(
                    server.port,
                    "/grpc.health.v1.Health/Check",
                    h2_client.frame(b""),
                    [("content-type", "application/grpc-web+proto")],
                )
                status = int(h2.headers[":status"])
            else:
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                connection.request(
                    "POST", "/grpc.health.v1.Health/Check", h2_client.frame(b""),
                    {"content-type": "application/grpc-web-text"},
                )  # fmt: skip
                status = connection.getresponse().status
                connection.close()
            assert status == 404
        assert_serving(server.target)
        time.sleep(1.0)  # what the calls above log is written by now
        envoy_log = server.envoy_log.read_text(errors="replace")
    finally:
        server.stop()
    log = capfd.readouterr().err
    for text in (log, envoy_log):
        for sign in ("Traceback", "InvalidStateError", "internal error", "ERROR"):
            assert sign not in text, text
    gone = [line for line in log.splitlines() if "the client went away" in line]
    assert gone and all(" INFO " in line for line in gone), log
    assert any("/moduleserve.v1.Datasets/UploadDataset: the client went away" in g for g in gone)
