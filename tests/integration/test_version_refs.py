"""Every route and RPC that takes a version resolves it as inference does: an alias, a
number, or "" (the default alias, else the latest), over both front ends, with models loaded
at start (--load-all) and aliases set before the server started."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import NotFoundError
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.api import Registry
from moduleserve.registry.demo.models import MyNet
from tests.helpers import EnvoyServer, ServerThread, server_settings

IMAGE = np.zeros((3, 8, 8), np.float32)


@pytest.fixture(params=["grpc", "envoy"])
def started(request: pytest.FixtureRequest, demo_registry: Registry) -> Iterator[Any]:
    """mynet: version 1 is `production` (the default alias) and `canary`; version 2, the
    latest, is `next`. Every model is loaded at start, at its default version."""
    torch.manual_seed(5)
    demo_registry.push("mynet", MyNet().state_dict())
    demo_registry.checkpoints.set_alias("mynet", "canary", 1)
    demo_registry.checkpoints.set_alias("mynet", "next", 2)
    settings = server_settings(
        demo_registry.settings.database_url(), demo_registry.settings.store, load_all=True
    )
    server = ServerThread(settings) if request.param == "grpc" else EnvoyServer(settings)
    yield server
    server.stop()


def rest(server: EnvoyServer, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_readiness_resolves_aliases_without_loading_anything(started: Any) -> None:
    with ModelClient(started.target) as client:
        ready = {ref: client.ready("mynet", ref) for ref in ("", "production", "canary", "1")}
        assert ready == dict.fromkeys(ready, True)
        not_ready = {ref: client.ready("mynet", ref) for ref in ("next", "2", "nosuch")}
        assert not_ready == dict.fromkeys(not_ready, False)
        assert not client.ready("ghost", "production")  # an unknown model is not ready
        # Asking loaded nothing: version 2 is still only in the registry.
        states = {(e.name, e.version): e.state for e in client.models()}
        assert states[("mynet", "1")] == "READY" and states[("mynet", "2")] == "UNAVAILABLE"
    if isinstance(started, EnvoyServer):  # the V2 REST routes exist under Envoy only
        assert rest(started, "/v2/models/mynet/versions/production/ready") == (
            200,
            {"name": "mynet", "ready": True},
        )
        assert rest(started, "/v2/models/mynet/versions/next/ready") == (
            400,
            {"name": "mynet", "ready": False},
        )


def test_statistics_metadata_and_config_resolve_aliases(started: Any) -> None:
    with ModelClient(started.target) as client:
        client.infer("mynet", IMAGE, version="canary")  # counted under version 1
        for ref in ("production", "canary", "1"):
            (stats,) = client.statistics("mynet", ref).model_stats
            assert (stats.name, stats.version, stats.inference_count) == ("mynet", "1", 1)
        assert list(client.statistics("mynet", "next").model_stats) == []  # not loaded
        with pytest.raises(NotFoundError, match="nosuch"):
            client.statistics("mynet", "nosuch")
        assert [s.version for s in client.statistics("mynet").model_stats] == ["1"]  # all
        for ref, version, compute in (("canary", "1", True), ("next", "2", False)):
            request = pb.ModelConfigRequest(name="mynet", version=ref)
            params = client.call("ModelConfig", request).config.parameters
            assert params["version"].string_value == version
            assert ("compute" in params) == compute  # said of a loaded version only
        assert client.metadata("mynet", "production").inputs[0].name == "x"
    if isinstance(started, EnvoyServer):
        status, body = rest(started, "/v2/models/mynet/versions/production/stats")
        assert status == 200
        assert [(s["version"], s["inference_count"]) for s in body["model_stats"]] == [("1", 1)]
        status, body = rest(started, "/v2/models/mynet/versions/canary/config")
        assert status == 200 and body["parameters"]["version"] == {"string_value": "1"}
        status, body = rest(started, "/v2/models/mynet/versions/nosuch/stats")
        assert status == 404 and "nosuch" in body["error"]
