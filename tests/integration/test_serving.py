"""Serving behaviour: eval mode, dynamic batching, a free event loop, backpressure, aliases."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import ResourceExhaustedError
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import MyNet
from tests.helpers import ServerThread, server_settings


def start(registry: Registry, **overrides: object) -> ServerThread:
    return ServerThread(
        server_settings(registry.settings.database_url(), registry.settings.store, **overrides)
    )


@pytest.fixture
def slow_registry(demo_registry: Registry) -> Registry:
    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 0.5}, [parse_input_spec("x:float32:-1,2")]
    )
    from tests.models import SlowNet

    demo_registry.push("slow", SlowNet().state_dict(), class_name="Slow")
    return demo_registry


def test_inference_runs_in_eval_mode(served: ServerThread, demo_registry: Registry) -> None:
    x = np.random.default_rng(1).standard_normal((4, 784)).astype(np.float32)
    with ModelClient(served.target) as client:
        first, second = client.infer("mlp", x), client.infer("mlp", x)
    np.testing.assert_array_equal(first, second)  # Dropout is off
    module = demo_registry.load_module("mlp")
    assert module.layers[1].running_mean.abs().sum() > 0  # the seeded BatchNorm statistics
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    # A lone sample would be impossible for train-mode BatchNorm; eval uses running statistics.
    np.testing.assert_allclose(client_single(served, x[0]), expected[0], rtol=1e-5, atol=1e-5)


def client_single(served: ServerThread, sample: np.ndarray) -> np.ndarray:
    with ModelClient(served.target) as client:
        return client.infer("mlp", sample)


@pytest.mark.parametrize("model", ["mynet", "nested", "mlp"])
def test_concurrent_requests_equal_local_forwards(
    served: ServerThread, demo_registry: Registry, model: str
) -> None:
    shape = (3, 8, 8) if model != "mlp" else (784,)
    samples = np.random.default_rng(2).standard_normal((48, *shape)).astype(np.float32)
    module = demo_registry.load_module(model)
    with torch.no_grad():
        expected = module(torch.from_numpy(samples)).numpy()
    with ModelClient(served.target) as client:
        client.load(model)
        results: list[np.ndarray | None] = [None] * len(samples)

        def ask(index: int) -> None:
            results[index] = client.infer(model, samples[index])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(samples))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_requests_arriving_during_a_forward_are_merged(slow_registry: Registry) -> None:
    server = start(slow_registry)
    try:
        with ModelClient(server.target) as client:
            client.load("slow")
            module = slow_registry.load_module("slow")
            samples = np.arange(16, dtype=np.float32).reshape(8, 2)
            results: dict[int, np.ndarray] = {}

            def ask(i: int) -> None:
                results[i] = client.infer("slow", samples[i])

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            stats = client.statistics("slow").model_stats[0]
        sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
        assert sum(size * count for size, count in sizes.items()) == 8  # warm-up is not counted
    finally:
        server.stop()
    with torch.no_grad():
        expected = module(torch.from_numpy(samples)).numpy()
    for i in range(8):
        np.testing.assert_allclose(results[i], expected[i], rtol=1e-6)
    assert max(sizes) > 1, sizes


def test_health_and_metadata_answer_during_a_long_forward(slow_registry: Registry) -> None:
    server = start(slow_registry)
    try:
        with ModelClient(server.target) as client, grpc.insecure_channel(server.target) as ch:
            client.load("slow")
            client.metadata("slow")  # cached: the infer below goes straight to ModelInfer
            pending = threading.Thread(target=client.infer, args=("slow", np.ones(2, np.float32)))
            pending.start()
            time.sleep(0.05)  # the forward (0.3 s) is now running on the compute thread
            started = time.monotonic()
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            info = client.metadata("slow")
            answered_in = time.monotonic() - started
            still_computing = pending.is_alive()
            pending.join(timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert info.inputs[0].name == "x"
        assert still_computing, f"health and metadata took {answered_in:.3f}s"
    finally:
        server.stop()


def test_full_queue_is_resource_exhausted(slow_registry: Registry) -> None:
    batching = {"slow": {"max_batch_size": 1, "max_queue_size": 1}}
    server = start(slow_registry, model_batching=batching)
    try:
        with ModelClient(server.target) as client:
            client.load("slow")
            errors: list[Exception] = []

            def ask() -> None:
                try:
                    client.infer("slow", np.ones(2, np.float32))
                except ResourceExhaustedError as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=ask) for _ in range(4)]
            for thread in threads:
                thread.start()
                time.sleep(0.02)
            for thread in threads:
                thread.join(timeout=30)
            assert errors and "queue is full" in str(errors[0])
            assert client.health() == "SERVING"
            assert client.infer("doubler", np.array([1.0], np.float32)).tolist() == [3.0]
    finally:
        server.stop()


@pytest.fixture
def moving_alias(demo_registry: Registry) -> Iterator[Registry]:
    torch.manual_seed(5)
    demo_registry.push("mynet", MyNet().state_dict())  # version 2, production still at 1
    yield demo_registry


def test_alias_move_is_picked_up_without_failing_a_request(
    served_inproc: ServerThread, moving_alias: Registry
) -> None:
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="mynet")
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    seen: list[list[str]] = [[] for _ in range(3)]  # versions answered, per client thread
    failures: list[Exception] = []
    stop = threading.Event()

    def hammer(versions: list[str]) -> None:
        with ModelClient(served_inproc.target) as client:
            while not stop.is_set():
                try:
                    versions.append(client.call("ModelInfer", request).model_version)
                except Exception as exc:  # any failure at all fails the test
                    failures.append(exc)

    workers = [threading.Thread(target=hammer, args=(v,)) for v in seen]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while not all(seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    moving_alias.checkpoints.set_alias("mynet", "production", 2)
    while not all(v and v[-1] == "2" for v in seen) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    assert failures == []
    for versions in seen:
        assert versions[0] == "1" and versions[-1] == "2"
        # Each thread's requests are sequential: once one was answered by version 2, every
        # later one is too (the swap happens once, after the new version is warm).
        first_two = versions.index("2")
        assert set(versions[first_two:]) == {"2"}
    assert [m.version.version for m in served_inproc.app.cache.loaded() if m.name == "mynet"] == [2]
