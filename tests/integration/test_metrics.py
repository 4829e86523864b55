"""Prometheus /metrics of a real server: histograms per version, series that outlive an
unload or an alias swap, one INFO line per load and unload with the real byte count, and
a scrape answered whatever idle connections are open."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.server.metrics import MAX_CONNECTIONS, MetricsServer
from tests.helpers import ServerThread, server_settings
from tests.models import SlowNet

Samples = dict[tuple[str, str], float]
HISTOGRAMS = (
    "moduleserve_request_duration_seconds",
    "moduleserve_queue_duration_seconds",
    "moduleserve_compute_duration_seconds",
    "moduleserve_batch_size",
)


@pytest.fixture
def metered(demo_registry: Registry, caplog: pytest.LogCaptureFixture) -> Iterator[ServerThread]:
    """A server with its metrics endpoint on a free port; cache logs captured."""
    caplog.set_level(logging.INFO, logger="moduleserve.server.engine.cache")
    settings = server_settings(
        demo_registry.settings.database_url(), demo_registry.settings.store, metrics_port=0
    )
    server = ServerThread(settings)
    yield server
    server.stop()


def scrape(server: ServerThread, family: str, model: str, version: int) -> Samples:
    """One family's samples for one model version: (sample name, le) -> value."""
    url = f"http://127.0.0.1:{server.app.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found: Samples = {}
    for metric in text_string_to_metric_families(text):
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.labels.get("model") == model and sample.labels.get("version") == str(version):
                key = sample.labels.get("le", sample.labels.get("outcome", ""))
                found[(sample.name, key)] = sample.value
    return found


def buckets(samples: Samples) -> list[float]:
    """A histogram's cumulative bucket counts in `le` order, +Inf last."""
    pairs = [
        (float(le), value) for (name, le), value in samples.items() if name.endswith("_bucket")
    ]
    return [value for _, value in sorted(pairs)]


def weight_bytes(registry: Registry, model: str, version: int) -> int:
    """What the model's weights take in memory: parameters and buffers, untied."""
    state = registry.state_dict(registry.checkpoints.resolve(model, str(version)))
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def test_latency_queue_compute_and_batch_size_are_histograms_per_version(
    metered: ServerThread,
) -> None:
    with ModelClient(metered.target) as client:
        for value in (1.0, 2.0, 3.0):
            client.infer("doubler", np.array([value], np.float32))
    for family in HISTOGRAMS:
        samples = scrape(metered, family, "doubler", 1)
        counts = buckets(samples)
        assert len(counts) > 5, family
        assert counts == sorted(counts), f"{family} buckets are not cumulative"
        assert counts[-1] == samples[(f"{family}_count", "")] == 3, family
    # One row per forward pass: every pass in the le=1 bucket, and rows summed.
    batch = scrape(metered, "moduleserve_batch_size", "doubler", 1)
    assert batch[("moduleserve_batch_size_bucket", "1.0")] == 3
    assert batch[("moduleserve_batch_size_sum", "")] == 3
    latency = scrape(metered, "moduleserve_request_duration_seconds", "doubler", 1)
    assert latency[("moduleserve_request_duration_seconds_sum", "")] > 0


def test_a_forward_pass_lands_in_the_bucket_of_its_duration(
    demo_registry: Registry, metered: ServerThread
) -> None:
    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 0.03}, [parse_input_spec("x:float32:-1,2")]
    )
    demo_registry.push("slow", SlowNet(0.03).state_dict(), class_name="Slow")
    with ModelClient(metered.target) as client:
        client.infer("slow", np.ones(2, np.float32))
    samples = scrape(metered, "moduleserve_compute_duration_seconds", "slow", 1)
    name = "moduleserve_compute_duration_seconds_bucket"
    # forward() sleeps 30 ms: nothing at or below 25 ms, the one pass by +Inf.
    assert samples[(name, "0.025")] == 0 and samples[(name, "+Inf")] == 1
    assert samples[("moduleserve_compute_duration_seconds_sum", "")] >= 0.03


def test_a_versions_series_survive_an_alias_swap_and_the_swap_is_logged(
    demo_registry: Registry, metered: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    demo_registry.push(
        "mynet", demo_registry.state_dict(demo_registry.checkpoints.resolve("mynet"))
    )
    with ModelClient(metered.target) as client:
        for _ in range(2):
            client.infer("mynet", np.zeros((3, 8, 8), np.float32))  # production -> 1
        demo_registry.checkpoints.set_alias("mynet", "production", 2)
        metered.run(metered.app.cache.refresh_aliases())
        client.infer("mynet", np.zeros((3, 8, 8), np.float32))  # production -> 2
    old = scrape(metered, "moduleserve_request_duration_seconds", "mynet", 1)
    assert old[("moduleserve_request_duration_seconds_count", "")] == 2
    requests = scrape(metered, "moduleserve_requests", "mynet", 1)
    assert requests[("moduleserve_requests_total", "success")] == 2
    new = scrape(metered, "moduleserve_request_duration_seconds", "mynet", 2)
    assert new[("moduleserve_request_duration_seconds_count", "")] == 1
    assert scrape(metered, "moduleserve_model_bytes", "mynet", 1) == {}  # unloaded
    size = weight_bytes(demo_registry, "mynet", 1)
    [loaded] = lines(caplog, "loaded mynet:2")
    assert loaded.startswith(f"loaded mynet:2 on cpu ({size} bytes) in ")
    assert loaded.endswith("s: alias 'production' moves here from version 1")
    assert lines(caplog, "unloaded mynet:1") == [
        f"unloaded mynet:1 ({size} bytes): alias 'production' moved to version 2"
    ]


def test_counters_never_go_back_when_a_version_unloads_and_loads_again(
    demo_registry: Registry, metered: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    family = "moduleserve_requests"
    with ModelClient(metered.target) as client:
        client.infer("doubler", np.array([1.0], np.float32))
        client.infer("doubler", np.array([2.0], np.float32))
        client.unload("doubler")
        assert scrape(metered, family, "doubler", 1)[(f"{family}_total", "success")] == 2
        client.infer("doubler", np.array([3.0], np.float32))  # loads again, new batcher
    assert scrape(metered, family, "doubler", 1)[(f"{family}_total", "success")] == 3
    latency = scrape(metered, "moduleserve_request_duration_seconds", "doubler", 1)
    assert buckets(latency)[-1] == 3
    size = weight_bytes(demo_registry, "doubler", 1)
    assert lines(caplog, "unloaded doubler:1") == [
        f"unloaded doubler:1 ({size} bytes): unload request"
    ]
    assert len(lines(caplog, f"loaded doubler:1 on cpu ({size} bytes) in ")) == 2


def test_a_scrape_is_answered_whatever_idle_connections_are_open(metered: ServerThread) -> None:
    with ModelClient(metered.target) as client:
        client.infer("doubler", np.array([1.0], np.float32))
    assert MAX_CONNECTIONS < 200
    idle = [socket.create_connection(("127.0.0.1", metered.metrics_port)) for _ in range(200)]
    try:
        family = "moduleserve_requests"
        assert scrape(metered, family, "doubler", 1)[(f"{family}_total", "success")] == 1
        with ModelClient(metered.target) as client:  # the server itself never noticed
            assert client.infer("doubler", np.array([2.0], np.float32)).tolist() == [5.0]
        assert scrape(metered, family, "doubler", 1)[(f"{family}_total", "success")] == 2
    finally:
        for sock in idle:
            sock.close()


async def serve_metrics(**timeouts: float) -> MetricsServer:
    registry = CollectorRegistry()
    Counter("scrapes_seen", "a counter to find in the answer", registry=registry).inc()
    server = MetricsServer(registry, **timeouts)
    await server.start("127.0.0.1", 0)
    return server


async def get_metrics(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_at_the_cap_the_longest_waiting_connection_makes_room() -> None:
    server = await serve_metrics(idle_timeout_s=60, head_timeout_s=60)
    try:
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(74)]
        # The ten that waited longest were closed for the ten past the cap; the rest wait.
        for reader, _ in conns[:10]:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        answer = await get_metrics(server.port)  # one more newcomer: conns[10] makes room
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"scrapes_seen_total 1.0" in answer
        assert await asyncio.wait_for(conns[10][0].read(), 10) == b""
        writer = conns[-1][1]  # a connection that kept its place is still served
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(conns[-1][0].readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: keep-alive" in head
        for _, writer in conns:
            writer.close()
    finally:
        await server.close()


async def test_idle_and_trickling_connections_are_closed_after_their_timeouts() -> None:
    server = await serve_metrics(idle_timeout_s=0.2, head_timeout_s=0.5)
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
        slow_writer.write(b"GET /metr")  # a head that never ends
        # Generous bounds: closed well within 10 s, though 0.2 s and 0.5 s are asked for.
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""
        assert await asyncio.wait_for(slow_reader.read(), 10) == b""
        for writer in (idle_writer, slow_writer):
            writer.close()
        assert (await get_metrics(server.port)).startswith(b"HTTP/1.1 200 OK")
    finally:
        await server.close()
