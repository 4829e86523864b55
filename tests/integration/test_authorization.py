"""Who may call what: every gRPC method and every REST route against the access policy,
over both front ends, with admin and read tokens configured.

The policy is written out below on its own, as the decisions it is (README "Security"),
so that a wrong entry in `server/security.py`'s table fails here twice: the table is
compared with it, and every call is made over the wire and must behave as it says.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import UnauthenticatedError
from moduleserve.client.introspection import IntrospectionClient
from moduleserve.client.oip import OIP_SERVICE
from moduleserve.client.pb import moduleserve_v1_pb2, oip_v2_pb2
from moduleserve.registry.api import Registry
from moduleserve.server.frontends.rest import routes
from moduleserve.server.security import GRPC_ACCESS, REST_ACCESS
from tests.helpers import EnvoyServer, ServerThread, seeded_registry, server_settings

pytestmark = pytest.mark.timeout(300)

ADMIN_TOKEN = "admin-s3cret"
READ_TOKEN = "read-s3cret"
Code = grpc.StatusCode

ADMIN, READ, OPEN = "admin", "read", "open"

_OIP_POLICY = {
    "ServerLive": OPEN,  # probes
    "ServerReady": OPEN,
    "ModelReady": OPEN,
    "ServerMetadata": OPEN,  # name, version, extensions: nothing of the registry
    "ModelMetadata": READ,  # registry contents
    "ModelConfig": READ,
    "ModelStatistics": READ,
    "RepositoryIndex": READ,
    "ModelInfer": READ,  # runs the models: protected by read tokens when they are set
    "RepositoryModelLoad": ADMIN,  # mutating
    "RepositoryModelUnload": ADMIN,
}
GRPC_POLICY: dict[str, str] = {
    **{
        f"/{service}/{name}": level
        for service in (OIP_SERVICE, "moduleserve.oip.v2.GRPCInferenceService")
        for name, level in _OIP_POLICY.items()
    },
    "/moduleserve.v1.Introspection/GetModuleTree": READ,
    "/moduleserve.v1.Introspection/ListTensors": READ,
    "/moduleserve.v1.Introspection/GetTensor": READ,  # returns weights
    "/moduleserve.v1.Introspection/DiffVersions": READ,
    "/moduleserve.v1.Jobs/CreateJob": ADMIN,
    "/moduleserve.v1.Jobs/CancelJob": ADMIN,
    "/moduleserve.v1.Jobs/PromoteJob": ADMIN,
    "/moduleserve.v1.Jobs/GetJob": READ,
    "/moduleserve.v1.Jobs/ListJobs": READ,
    "/moduleserve.v1.Jobs/WatchJob": READ,
    "/moduleserve.v1.Jobs/ListJobEvents": READ,
    "/moduleserve.v1.Datasets/UploadDataset": ADMIN,
    "/moduleserve.v1.Datasets/ListDatasets": READ,
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.health.v1.Health/List": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": OPEN,
}
_MODEL = "/v2/models/{model}[/versions/{version}]"
REST_POLICY: dict[tuple[str, str], str] = {
    ("GET", "/v2"): OPEN,
    ("GET", "/v2/health/live"): OPEN,
    ("GET", "/v2/health/ready"): OPEN,
    ("GET", f"{_MODEL}/ready"): OPEN,
    ("GET", _MODEL): READ,
    ("GET", f"{_MODEL}/config"): READ,
    ("GET", f"{_MODEL}/stats"): READ,
    ("GET", "/v2/models/stats"): READ,
    ("POST", "/v2/repository/index"): READ,
    ("POST", f"{_MODEL}/infer"): READ,
    ("POST", "/v2/repository/models/{model}/load"): ADMIN,
    ("POST", "/v2/repository/models/{model}/unload"): ADMIN,
}

_SERVICES: dict[str, ServiceDescriptor] = {
    OIP_SERVICE: oip_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    **{
        service.full_name: service
        for module in (oip_v2_pb2, moduleserve_v1_pb2, health_pb2, reflection_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    },
}


def descriptor(path: str) -> MethodDescriptor:
    service, name = path.strip("/").split("/")
    return _SERVICES[service].methods_by_name[name]


# --- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = seeded_registry(tmp_path_factory.mktemp("authorization"))
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def started(registry: Registry) -> Iterator[dict[str, Any]]:
    """The servers this module started, by front end: each starts once, on first use,
    and serves every test here (their calls change nothing, or load and unload doubler)."""
    servers: dict[str, Any] = {}
    yield servers
    for found in servers.values():
        found.stop()


def guarded_server(started: dict[str, Any], registry: Registry, frontend: str) -> Any:
    """A server with admin and read tokens on `frontend` (grpc.aio or Envoy)."""
    if frontend not in started:
        settings = server_settings(
            registry.settings.database_url(),
            registry.settings.store,
            tokens=[ADMIN_TOKEN],
            read_tokens=[READ_TOKEN],
        )
        started[frontend] = ServerThread(settings) if frontend == "grpc" else EnvoyServer(settings)
    return started[frontend]


@pytest.fixture(scope="module", params=["grpc", "envoy"])
def server(request: pytest.FixtureRequest, started: dict[str, Any], registry: Registry) -> Any:
    return guarded_server(started, registry, request.param)


@pytest.fixture(scope="module")
def envoy(started: dict[str, Any], registry: Registry) -> EnvoyServer:
    """REST is served under Envoy only (the grpc.aio front end has no HTTP routes)."""
    found: EnvoyServer = guarded_server(started, registry, "envoy")
    return found


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


# --- gRPC -------------------------------------------------------------------------------------


def outcome(channel: grpc.Channel, path: str, token: str | None) -> tuple[Code, str]:
    """The status of one call of `path` with an empty request (or empty request stream)."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    method = descriptor(path)
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter(()), metadata=metadata, timeout=30))
        elif method.client_streaming:
            channel.stream_unary(path)(iter(()), metadata=metadata, timeout=30)
        elif method.server_streaming:
            responses = channel.unary_stream(path)(b"", metadata=metadata, timeout=30)
            next(responses, None)  # the first message or the end: a watch never ends
            responses.cancel()
        else:
            channel.unary_unary(path)(b"", metadata=metadata, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


def assert_passes(path: str, found: tuple[Code, str]) -> None:
    """The call reached its handler: whatever it answered, it was not an access refusal
    (nor a method the server does not have)."""
    code, details = found
    assert code not in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED), (path, code, details)
    assert not details.startswith("Method not found"), (path, details)


@pytest.mark.parametrize("path", sorted(GRPC_POLICY))
def test_each_grpc_method_needs_what_the_policy_says(channel: grpc.Channel, path: str) -> None:
    level = GRPC_POLICY[path]
    anonymous = outcome(channel, path, None)
    if level == OPEN:
        assert_passes(path, anonymous)
        assert_passes(path, outcome(channel, path, "not-a-token"))
        return
    code, details = anonymous
    assert code == Code.UNAUTHENTICATED, (path, code, details)
    assert "send an 'authorization: Bearer <token>' header (gRPC metadata)" in details
    needed = "an admin token" if level == ADMIN else "a read or admin token"
    assert f"{path.rsplit('/', 1)[1]} needs {needed}" in details
    wrong_code, wrong = outcome(channel, path, "not-a-token")
    assert wrong_code == Code.PERMISSION_DENIED, (path, wrong_code, wrong)
    assert wrong == "the bearer token is not one of the server's tokens"
    reader = outcome(channel, path, READ_TOKEN)
    if level == READ:
        assert_passes(path, reader)
    else:
        assert reader[0] == Code.PERMISSION_DENIED, (path, reader)
        assert "needs an admin token; the bearer token is a read token" in reader[1]
    assert_passes(path, outcome(channel, path, ADMIN_TOKEN))


def test_weights_go_to_a_read_token_only(channel: grpc.Channel, registry: Registry) -> None:
    """GetTensor returns parameter values: refused without a token, answered with one."""
    with pytest.raises(UnauthenticatedError):
        IntrospectionClient(channel, timeout=30).tensor("doubler", "linear.weight")
    reader = IntrospectionClient(channel, metadata=[("authorization", f"Bearer {READ_TOKEN}")])
    got = reader.tensor("doubler", "linear.weight", as_torch=True)
    assert torch.equal(got, registry.load_module("doubler").linear.weight.detach())


def test_inference_with_a_read_token(server: Any) -> None:
    x = np.array([[4.0], [5.0]], np.float32)
    with ModelClient(server.target, timeout=30) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.infer("doubler", x)
    with ModelClient(server.target, token=READ_TOKEN, timeout=30) as reader:
        assert reader.infer("doubler", x).tolist() == [[9.0], [11.0]]


# --- REST (served under Envoy only) -----------------------------------------------------------


def rest_call(server: EnvoyServer, method: str, path: str, token: str | None) -> tuple[int, Any]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        body = b"{}" if method == "POST" else None
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return response.status, json.loads(data) if data else {}


def rest_paths(pattern: str) -> list[str]:
    """The concrete paths of a route pattern, with and without its optional version."""
    concrete = pattern.replace("{model}", "doubler")
    if "[/versions/{version}]" not in concrete:
        return [concrete]
    return [concrete.replace("[/versions/{version}]", v) for v in ("", "/versions/1")]


def assert_rest_passes(path: str, found: tuple[int, Any]) -> None:
    """The route's handler answered: not an access refusal, nor a path it does not serve."""
    status, body = found
    assert status not in (401, 403, 405), (path, status, body)
    error = body.get("error", "") if isinstance(body, dict) else ""
    assert not error.startswith("no such endpoint"), (path, body)


@pytest.mark.parametrize("route", sorted(REST_POLICY), ids=" ".join)
def test_each_rest_route_needs_what_the_policy_says(
    envoy: EnvoyServer, route: tuple[str, str]
) -> None:
    method, pattern = route
    level = REST_POLICY[route]
    for path in rest_paths(pattern):
        anonymous = rest_call(envoy, method, path, None)
        if level == OPEN:
            assert_rest_passes(path, anonymous)
            continue
        status, body = anonymous
        assert status == 401, (path, status, body)
        assert "send an 'authorization: Bearer <token>' HTTP header" in body["error"]
        assert rest_call(envoy, method, path, "not-a-token")[0] == 403
        reader = rest_call(envoy, method, path, READ_TOKEN)
        if level == READ:
            assert_rest_passes(path, reader)
        else:
            assert reader[0] == 403, (path, reader)
        assert_rest_passes(path, rest_call(envoy, method, path, ADMIN_TOKEN))


# --- the table covers everything the server serves ----------------------------------------


def test_the_table_is_the_policy() -> None:
    assert {path: level.value for path, level in GRPC_ACCESS.items()} == GRPC_POLICY
    assert {route: level.value for route, level in REST_ACCESS.items()} == REST_POLICY


class _Recorder:
    """A HandlerRegistry that keeps what `Core.add_services` registers."""

    def __init__(self) -> None:
        self.methods: set[str] = set()
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.methods.update(f"/{service}/{name}" for name in handlers)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def advertised_services(target: str) -> list[str]:
    """The services the server lists through reflection."""
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    return [s.name for s in answer.list_services_response.service]


def test_every_registered_method_and_route_has_an_entry(demo_registry: Registry) -> None:
    """The real server's registrations: each service's methods, and what its generic handlers
    answer to (probed with every method name of every service it advertises or we know)."""
    server = ServerThread(
        server_settings(demo_registry.settings.database_url(), demo_registry.settings.store)
    )
    try:
        services = {*advertised_services(server.target), *_SERVICES}
        recorder = _Recorder()
        server.app.core.add_services(recorder)
    finally:
        server.stop()
    names = {m.name for s in _SERVICES.values() for m in s.methods}
    found = set(recorder.methods)
    for generic in recorder.generic:
        for service in services:
            for name in names:
                path = f"/{service}/{name}"
                if generic.service(_Details(path)) is not None:
                    found.add(path)
    assert recorder.generic and OIP_SERVICE in services  # the probe did look
    assert sorted(found - set(GRPC_ACCESS)) == [], "registered methods without a table entry"
    assert sorted(set(GRPC_ACCESS) - found) == [], "table entries no server method has"
    served_routes = set(routes())
    assert sorted(served_routes - set(REST_ACCESS)) == [], "REST routes without a table entry"
    assert sorted(set(REST_ACCESS) - served_routes) == [], "table entries no REST route has"
