"""Hostile requests: malformed bytes, absurd versions, shapes and names, memory abuse, load
failures and anonymous loads. Each gets a status with one short sentence; the server serves on."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import PermissionDeniedError
from moduleserve.client.oip import method_path
from moduleserve.client.pb import moduleserve_v1_pb2 as v1
from moduleserve.client.pb import moduleserve_v1_pb2_grpc as v1_grpc
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.seed import seed_demo
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.names import parse_ref
from moduleserve.server.cli import build_parser, settings_from
from tests.helpers import (
    REPO,
    EnvoyServer,
    ServerThread,
    push_unchecked,
    registry_settings,
    server_settings,
)
from tests.models import BrokenWarmup, Doubler

Code = grpc.StatusCode
# What a client lets through of a status message (gRPC's default metadata soft limit).
CLIENT_METADATA_LIMIT = 8192


def start(registry: Registry, **overrides: object) -> ServerThread:
    return ServerThread(
        server_settings(registry.settings.database_url(), registry.settings.store, **overrides)
    )


@pytest.fixture(scope="module", params=["grpc", "envoy"])
def probed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread | EnvoyServer]:
    """One server over the demo registry for the read-only probes below, per front end."""
    tmp = tmp_path_factory.mktemp("probed")
    registry = Registry(registry_settings(f"sqlite:///{tmp / 'registry.db'}", tmp / "store"))
    registry.init()
    seed_demo(registry)
    settings = server_settings(registry.settings.database_url(), registry.settings.store)
    server = ServerThread(settings) if request.param == "grpc" else EnvoyServer(settings)
    yield server
    server.stop()
    registry.close()


def unary(target: str, method: str, request: object, response: type) -> object:
    """Call one unary method by its full path with a fresh channel."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,  # type: ignore[attr-defined]
            response_deserializer=response.FromString,  # type: ignore[attr-defined]
        )
        return call(request)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The error a call ends with (it must end with one)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    details = err.value.details() or ""
    assert "Traceback" not in details and "Unexpected" not in details, details
    return err.value


def assert_serving(target: str) -> None:
    """Health says SERVING and a real inference still answers."""
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    response = unary(target, method_path("ModelInfer"), mynet_request(), pb.ModelInferResponse)
    assert response.outputs[0].shape == [1, 10]  # type: ignore[attr-defined]


def mynet_request(
    shape: list[int] | None = None, version: str = "", model: str = "mynet"
) -> pb.ModelInferRequest:
    shape = [1, 3, 8, 8] if shape is None else shape
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(bytes(4 * int(np.prod(shape))))
    return request


def ref(version: str = "", model: str = "mynet") -> v1.ModelRef:
    return v1.ModelRef(model=model, version=version)


# -- versions ------------------------------------------------------------------------------

BAD_VERSIONS = [
    ("unicode superscript", "²"),  # str.isdigit() says yes, int() says no
    ("arabic-indic digit", "٣"),  # int() reads 3: versions are ASCII
    ("past int64", "99999999999999999999"),  # SQLite cannot bind it
    ("2^63", "9223372036854775808"),
    ("past the column", "2147483648"),  # PostgreSQL's INTEGER
    ("negative", "-1"),
    ("thousands of digits", "9" * 5000),  # int() refuses past 4300 digits
    ("long non-ASCII", "é" * 5000),
]

VERSIONED_CALLS: list[tuple[str, Callable[[str, str], object]]] = [
    (
        "ModelInfer",
        lambda t, v: unary(
            t, method_path("ModelInfer"), mynet_request(version=v), pb.ModelInferResponse
        ),
    ),
    (
        "ModelMetadata",
        lambda t, v: unary(
            t,
            method_path("ModelMetadata"),
            pb.ModelMetadataRequest(name="mynet", version=v),
            pb.ModelMetadataResponse,
        ),
    ),
    (
        "ModelReady",
        lambda t, v: unary(
            t,
            method_path("ModelReady"),
            pb.ModelReadyRequest(name="mynet", version=v),
            pb.ModelReadyResponse,
        ),
    ),
    (
        "ModelConfig",
        lambda t, v: unary(
            t,
            method_path("ModelConfig"),
            pb.ModelConfigRequest(name="mynet", version=v),
            pb.ModelConfigResponse,
        ),
    ),
    (
        "GetModuleTree",
        lambda t, v: introspect(t, "GetModuleTree", v1.GetModuleTreeRequest(model=ref(v))),
    ),
    (
        "GetTensor",
        lambda t, v: introspect(t, "GetTensor", v1.GetTensorRequest(model=ref(v), name="fc.bias")),
    ),
]


def introspect(target: str, method: str, request: object) -> Any:
    """Call one Introspection method with a fresh channel."""
    with grpc.insecure_channel(target) as channel:
        return getattr(v1_grpc.IntrospectionStub(channel), method)(request)


@pytest.mark.parametrize(("case", "version"), BAD_VERSIONS, ids=[c for c, _ in BAD_VERSIONS])
def test_a_bad_version_is_invalid_argument_in_every_rpc(
    probed: ServerThread | EnvoyServer, case: str, version: str
) -> None:
    for name, call in VERSIONED_CALLS:
        error = refused(lambda: call(probed.target, version))  # noqa: B023
        assert error.code() == Code.INVALID_ARGUMENT, (name, error.details())
        assert (error.details() or "").startswith("invalid version"), (name, error.details())
        assert len(error.details() or "") < 300, name
    assert_serving(probed.target)


@pytest.mark.parametrize("version", ["2147483648", 2**40, 2**63])
def test_versions_past_the_column_are_refused_on_both_databases(
    registry: Registry, version: str | int
) -> None:
    registry.classes.register(
        "Doubler", "tests.models:Doubler", {}, [parse_input_spec("x:float32:-1,1")]
    )
    registry.push("doubler", Doubler().state_dict(), class_name="Doubler")
    with pytest.raises(InvalidInputError, match="versions are whole numbers from 1 to"):
        registry.checkpoints.resolve("doubler", version)
    assert registry.checkpoints.resolve("doubler", "1").version == 1


def test_one_parser_reads_numbers_aliases_and_the_default() -> None:
    assert parse_ref("") == "" and parse_ref("007") == 7 and parse_ref(3) == 3
    assert parse_ref("production") == "production"
    for text in ["²", "٣", "+1", "1.0", "a/b", "x" * 65, "0"]:
        with pytest.raises(InvalidInputError, match="invalid version"):
            parse_ref(text)


# -- shapes and slices ---------------------------------------------------------------------


def typed_request(shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mynet")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    return request


@pytest.mark.parametrize(
    ("make", "sentence"),
    [
        (lambda: mynet_request([0, 2**62, 2**62, 8]), "is too large for any tensor"),
        (lambda: typed_request([0, 2**62, 2**62, 8]), "is too large for any tensor"),
        (lambda: mynet_request([0, 2**62, 2]), "is too large for any tensor"),
        (lambda: mynet_request([1] * 100), "has 100 dimensions, more than 64"),
    ],
    ids=["zero beside overflow (raw)", "zero beside overflow (typed)", "stride overflow", "rank"],
)
def test_shapes_past_int64_are_refused_before_allocating(
    probed: ServerThread | EnvoyServer, make: Callable[[], pb.ModelInferRequest], sentence: str
) -> None:
    error = refused(
        lambda: unary(probed.target, method_path("ModelInfer"), make(), pb.ModelInferResponse)
    )
    assert error.code() == Code.INVALID_ARGUMENT
    assert sentence in (error.details() or "")
    assert_serving(probed.target)


HUGE = "9999999999999999999"


@pytest.mark.parametrize(
    ("slices", "index"),
    [
        (f"::{HUGE}", (slice(None, None, 16),)),
        (f"...,::{HUGE}", (Ellipsis, slice(None, None, 3))),
        (f"2::{HUGE}", (slice(2, None, 16),)),
        (f":,::{HUGE}", (slice(None), slice(None, None, 3))),
        (f"-{HUGE}:{HUGE}", (slice(None),)),
    ],
)
def test_huge_slice_steps_and_bounds_select_what_python_would(
    probed: ServerThread | EnvoyServer, slices: str, index: tuple[object, ...]
) -> None:
    whole = introspect(
        probed.target, "GetTensor", v1.GetTensorRequest(model=ref(), name="conv.weight")
    )
    sliced = v1.GetTensorRequest(model=ref(), name="conv.weight", slices=slices)
    part = introspect(probed.target, "GetTensor", sliced)
    full = np.frombuffer(whole.data, np.float32).reshape(list(whole.shape))
    expected = full[index]  # type: ignore[index]
    assert list(part.shape) == list(expected.shape)
    assert np.array_equal(np.frombuffer(part.data, np.float32).reshape(expected.shape), expected)
    assert_serving(probed.target)


# -- names ---------------------------------------------------------------------------------

LONG = "é" * 10_000  # 20 kB of UTF-8, 60 kB once percent-encoded into a trailer


@pytest.mark.parametrize(
    ("call", "code", "sentence"),
    [
        (
            lambda t: unary(
                t, method_path("ModelInfer"), mynet_request(model=LONG), pb.ModelInferResponse
            ),
            Code.INVALID_ARGUMENT,
            "invalid model name",
        ),
        (
            lambda t: unary(
                t,
                method_path("ModelMetadata"),
                pb.ModelMetadataRequest(name=LONG),
                pb.ModelMetadataResponse,
            ),
            Code.INVALID_ARGUMENT,
            "invalid model name",
        ),
        (
            lambda t: introspect(
                t, "GetModuleTree", v1.GetModuleTreeRequest(model=ref(model=LONG))
            ),
            Code.INVALID_ARGUMENT,
            "invalid model name",
        ),
        (
            lambda t: introspect(t, "GetTensor", v1.GetTensorRequest(model=ref(), name=LONG)),
            Code.NOT_FOUND,
            "tensor",
        ),
        (
            lambda t: unary(t, method_path("ModelInfer"), _long_input(), pb.ModelInferResponse),
            Code.INVALID_ARGUMENT,
            "is not an input of model 'mynet'",
        ),
    ],
    ids=["ModelInfer model", "ModelMetadata model", "GetModuleTree model", "tensor", "input"],
)
def test_long_names_are_refused_with_a_message_clients_receive(
    probed: ServerThread | EnvoyServer, call: Callable[[str], object], code: Code, sentence: str
) -> None:
    error = refused(lambda: call(probed.target))
    assert error.code() == code, error.details()
    details = error.details() or ""
    assert sentence in details
    assert len(details.encode()) <= 1024 < CLIENT_METADATA_LIMIT
    assert_serving(probed.target)


def _long_input() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mynet")
    request.inputs.add(name=LONG, datatype="FP32", shape=[1])
    request.raw_input_contents.append(bytes(4))
    return request


# -- undecodable bytes ---------------------------------------------------------------------

GARBAGE = b"\xff\xff\xff"


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("/inference.GRPCInferenceService/ModelInfer", "unary"),
        ("/moduleserve.oip.v2.GRPCInferenceService/ModelMetadata", "unary"),
        ("/moduleserve.v1.Introspection/GetTensor", "unary"),
        ("/grpc.health.v1.Health/Check", "unary"),
        ("/moduleserve.v1.Jobs/WatchJob", "server stream"),
        ("/moduleserve.v1.Datasets/UploadDataset", "client stream"),
    ],
)
def test_undecodable_bytes_are_invalid_argument(
    probed: ServerThread | EnvoyServer, method: str, kind: str
) -> None:
    with grpc.insecure_channel(probed.target) as channel:
        if kind == "unary":
            call: Callable[[], object] = lambda: channel.unary_unary(method)(GARBAGE)  # noqa: E731
        elif kind == "server stream":
            call = lambda: list(channel.unary_stream(method)(GARBAGE))  # noqa: E731
        else:
            call = lambda: channel.stream_unary(method)(iter([GARBAGE]))  # noqa: E731
        error = refused(call)
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    name = method.rsplit("/", 1)[1]
    assert error.details() == (
        f"the {name} request could not be decoded: it is not a valid protobuf message of "
        "that method's request type"
    )
    assert_serving(probed.target)


# -- memory --------------------------------------------------------------------------------

SENDER = """
import sys, grpc
from moduleserve.client.oip import method_path
from moduleserve.client.pb import oip_v2_pb2 as pb
target, model, count, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
options = [("grpc.max_send_message_length", 2**31 - 1)]
with grpc.insecure_channel(target, options=options) as channel:
    infer = channel.unary_unary(method_path("ModelInfer"))
    for _ in range(count):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="x", datatype="FP32", shape=[nbytes // 8, 2])
        request.raw_input_contents.append(bytes(nbytes))
        try:
            infer(request.SerializeToString())
        except grpc.RpcError as error:
            print(error.code().name)
"""
MIB = 2**20


def rss() -> int:
    """This process's resident memory once the allocator handed back what it could: freed
    but cached memory would otherwise look like memory still held."""
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere RSS as is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


@pytest.mark.parametrize(
    ("model", "nbytes", "code"),
    [
        ("mynet", 32 * MIB, "INVALID_ARGUMENT"),  # decoded, then refused for its shape
        ("broken", 32 * MIB, "UNAVAILABLE"),  # decoded, then refused: its load failed
        ("mynet", 65 * MIB, "RESOURCE_EXHAUSTED"),  # past the default 64 MiB limit
    ],
    ids=["bad shape", "failed load", "over the limit"],
)
def test_refused_large_requests_leave_no_memory_behind(
    demo_registry: Registry, model: str, nbytes: int, code: str
) -> None:
    demo_registry.classes.register(
        "Broken", "tests.models:BrokenWarmup", {}, [parse_input_spec("x:float32:-1,2")]
    )
    push_unchecked(demo_registry, "broken", BrokenWarmup().state_dict(), "Broken")
    server = start(demo_registry)  # the default max_message_mb
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        assert_serving(server.target)
        # A first round brings the allocator to its steady state. A leak then grows with
        # every round, while this shared test process's other noise comes and goes: the
        # smallest growth of three rounds is the server's own.
        assert _send(server.target, model, nbytes, env) == [code] * REFUSED
        rounds = [_measured_round(server.target, model, nbytes, code, env) for _ in range(3)]
        assert_serving(server.target)
    finally:
        server.stop()
    # Held until a full GC was the bug: a reference cycle kept each refused request alive.
    freed_by_gc = min(r[1] for r in rounds)
    assert freed_by_gc < nbytes // 2, f"{freed_by_gc / MIB:.0f} MiB freed only by GC"
    held = min(r[0] for r in rounds)
    assert held < nbytes, f"{held / MIB:.0f} MiB held after {REFUSED} more calls"


def _measured_round(
    target: str, model: str, nbytes: int, code: str, env: dict[str, str]
) -> tuple[int, int]:
    """(RSS growth over one round of refused requests, what a full GC then frees)."""
    gc.collect()
    before = rss()
    assert _send(target, model, nbytes, env) == [code] * REFUSED
    held = rss()
    gc.collect()
    return held - before, held - rss()


REFUSED = 6


def _send(target: str, model: str, nbytes: int, env: dict[str, str]) -> list[str]:
    """Send REFUSED requests of `nbytes` from another process (so that only the server's
    memory is measured here); their status codes."""
    result = subprocess.run(
        [sys.executable, "-c", SENDER, target, model, str(REFUSED), str(nbytes)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


# -- load failures -------------------------------------------------------------------------


def _drift_class(registry: Registry, name: str, kwargs: str) -> None:
    """Change a registered class's kwargs behind the registry's back, as an edited class
    does: its stored checkpoints no longer fit, or it no longer builds."""
    engine = sa.create_engine(registry.settings.database_url())
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE module_classes SET kwargs = :kwargs WHERE name = :name"),
            {"kwargs": kwargs, "name": name},
        )
    engine.dispose()


def _push_doubler(registry: Registry, model: str, features: int) -> None:
    spec = parse_input_spec(f"x:float32:-1,{features}")
    registry.classes.register(model.title(), "tests.models:Doubler", {"features": features}, [spec])
    registry.push(model, Doubler(features).state_dict(), class_name=model.title())


def _infer_error(target: str, model: str, width: int) -> grpc.RpcError:
    request = mynet_request([1, width], model=model)
    return refused(lambda: unary(target, method_path("ModelInfer"), request, pb.ModelInferResponse))


def _tensor_error(target: str, model: str) -> grpc.RpcError:
    request = v1.GetTensorRequest(model=ref(model=model), name="linear.bias")
    return refused(lambda: introspect(target, "GetTensor", request))


def _diff_error(target: str, model: str) -> grpc.RpcError:
    request = v1.DiffVersionsRequest(base=ref(model=model), other=ref(model=model))
    return refused(lambda: introspect(target, "DiffVersions", request))


MISMATCH = (
    "model 'drifted' version 1 cannot be loaded: state_dict does not fit class 'Drifted': "
    "shape mismatch for linear.bias: expected [3], got [2]; "
    "shape mismatch for linear.weight: expected [3, 3], got [2, 2]"
)
UNBUILDABLE = (
    "model 'keyed' version 1 failed to load: its class could not be imported or built "
    "(details in the server log)"
)


def test_load_errors_say_what_failed_but_never_quote_user_code(demo_registry: Registry) -> None:
    demo_registry.classes.register(
        "Broken", "tests.models:BrokenWarmup", {}, [parse_input_spec("x:float32:-1,2")]
    )
    push_unchecked(demo_registry, "broken", BrokenWarmup().state_dict(), "Broken")
    _push_doubler(demo_registry, "drifted", 2)
    _drift_class(demo_registry, "Drifted", '{"features": 3}')
    _push_doubler(demo_registry, "keyed", 1)  # its constructor now fails, quoting a secret
    _drift_class(demo_registry, "Keyed", '{"features": 1, "api_key": "hunter2"}')
    server = start(demo_registry)
    try:
        broken = _infer_error(server.target, "broken", 2)
        assert (broken.code(), broken.details()) == (
            Code.UNAVAILABLE,
            "model 'broken' version 1 failed its warm-up forward pass (details in the server log)",
        )
        again = _infer_error(server.target, "broken", 2)  # within the retry delay
        assert (again.code(), again.details()) == (broken.code(), broken.details())
        for error in (
            _infer_error(server.target, "drifted", 2),
            _tensor_error(server.target, "drifted"),
        ):
            assert (error.code(), error.details()) == (Code.FAILED_PRECONDITION, MISMATCH)
        for error in (
            _infer_error(server.target, "keyed", 1),
            _tensor_error(server.target, "keyed"),
            _diff_error(server.target, "keyed"),
        ):
            assert (error.code(), error.details()) == (Code.UNAVAILABLE, UNBUILDABLE)
        with ModelClient(server.target) as client:
            reasons = {e.name: e.reason for e in client.models()}
        assert reasons["broken"] == "failed its warm-up forward pass (details in the server log)"
        assert reasons["drifted"] == MISMATCH.removeprefix("model 'drifted' version 1 ")
        assert reasons["keyed"] == UNBUILDABLE.removeprefix("model 'keyed' version 1 ")
        assert reasons["mlp"] == "unloaded (loads on first request or RepositoryModelLoad)"
        assert_serving(server.target)
    finally:
        server.stop()


def test_a_class_outside_the_allowed_prefixes_is_permission_denied(
    demo_registry: Registry,
) -> None:
    server = start(demo_registry, allowed_class_prefixes=["moduleserve.registry.demo"])
    try:
        with ModelClient(server.target) as client:
            with pytest.raises(PermissionDeniedError) as err:
                client.load("doubler")
            assert err.value.details == (
                "model 'doubler' version 1 cannot be loaded: its class 'Doubler' is outside "
                "this server's allowed class prefixes"
            )
            reasons = {e.name: e.reason for e in client.models()}
            assert reasons["doubler"].startswith("cannot be loaded: its class 'Doubler'")
            assert client.health() == "SERVING"
    finally:
        server.stop()


# -- anonymous loads -----------------------------------------------------------------------


def test_without_lazy_loading_anonymous_requests_cannot_load_or_evict(
    demo_registry: Registry,
) -> None:
    mynet = demo_registry.checkpoints.resolve("mynet").size
    server = start(
        demo_registry,
        lazy_load=False,
        tokens=["operator-token"],
        memory_budget_mb=1.5 * mynet / MIB,  # room for mynet alone
    )
    try:
        with ModelClient(server.target, token="operator-token") as operator:
            operator.load("mynet")
        other = mynet_request(model="nested")  # with mynet loaded, it would not fit
        error = refused(
            lambda: unary(server.target, method_path("ModelInfer"), other, pb.ModelInferResponse)
        )
        assert error.code() == Code.UNAVAILABLE
        assert error.details() == (
            "model 'nested' version 1 is not loaded, and this server loads models only when "
            "an operator asks (RepositoryModelLoad: moduleserve load nested)"
        )
        assert [m.name for m in server.app.cache.loaded()] == ["mynet"]
        with ModelClient(server.target) as anonymous:
            reasons = {e.name: e.reason for e in anonymous.models()}
        assert reasons["nested"] == "unloaded (loads on RepositoryModelLoad only)"
        assert_serving(server.target)  # the operator's model still answers anyone
    finally:
        server.stop()


def test_lazy_loading_is_on_by_default_and_has_a_flag() -> None:
    parser = build_parser()
    assert settings_from(parser.parse_args([])).lazy_load is True
    assert settings_from(parser.parse_args(["--no-lazy-load"])).lazy_load is False
    assert settings_from(parser.parse_args([])).max_message_mb == 64
