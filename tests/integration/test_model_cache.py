"""The model cache: lazy and explicit loads, LRU under a memory budget, memory really freed."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import UnavailableError
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.server.engine.batcher import DynamicBatcher
from tests.helpers import ServerThread, push_unchecked, server_settings
from tests.models import Wide


def start(registry: Registry, **overrides: object) -> ServerThread:
    return ServerThread(
        server_settings(registry.settings.database_url(), registry.settings.store, **overrides)
    )


def loaded(server: ServerThread) -> list[str]:
    return sorted(f"{m.name}:{m.version.version}" for m in server.app.cache.loaded())


def test_lazy_load_then_explicit_unload(served_inproc: ServerThread) -> None:
    with ModelClient(served_inproc.target) as client:
        assert loaded(served_inproc) == []
        assert client.health("mynet") == "SERVICE_UNKNOWN"
        client.infer("mynet", np.zeros((3, 8, 8), np.float32))
        assert loaded(served_inproc) == ["mynet:1"]
        assert client.health("mynet") == "SERVING"
        client.unload("mynet")
        assert loaded(served_inproc) == [] and not client.ready("mynet")
        assert client.health("mynet") == "NOT_SERVING"


def test_least_recently_used_model_is_evicted_beyond_the_budget(
    demo_registry: Registry,
) -> None:
    sizes = {m: demo_registry.checkpoints.resolve(m).size for m in ("mynet", "nested", "mlp")}
    budget_mb = (sizes["mlp"] + sizes["nested"] + sizes["mynet"] // 2) / 2**20
    server = start(demo_registry, memory_budget_mb=budget_mb)
    try:
        with ModelClient(server.target) as client:
            client.load("mlp")
            client.load("nested")
            client.infer("mlp", np.zeros(784, np.float32))  # mlp is now the most recent
            client.load("mynet")  # does not fit: the least recently used (nested) goes
            assert loaded(server) == ["mlp:1", "mynet:1"]
    finally:
        server.stop()


def test_a_model_larger_than_the_budget_is_refused_with_a_sentence(
    demo_registry: Registry,
) -> None:
    server = start(demo_registry, memory_budget_mb=0.01)
    try:
        with ModelClient(server.target) as client:
            with pytest.raises(UnavailableError, match="more than the memory budget"):
                client.load("mlp")
            assert client.health() == "SERVING"
    finally:
        server.stop()


def test_warm_up_failure_keeps_the_model_unready(demo_registry: Registry) -> None:
    demo_registry.classes.register(
        "Broken", "tests.models:BrokenWarmup", {}, [parse_input_spec("x:float32:-1,2")]
    )
    from tests.models import BrokenWarmup

    push_unchecked(demo_registry, "broken", BrokenWarmup().state_dict(), "Broken")
    server = start(demo_registry)
    try:
        with ModelClient(server.target) as client:
            with pytest.raises(UnavailableError, match="failed its warm-up forward pass"):
                client.infer("broken", np.zeros(2, np.float32))
            assert not client.ready("broken") and loaded(server) == []
            assert client.health() == "SERVING"
    finally:
        server.stop()


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_loading_holds_one_copy_and_unloading_frees_it(demo_registry: Registry) -> None:
    demo_registry.classes.register(
        "Wide",
        "tests.models:Wide",
        {"features": 2048, "layers": 8},
        [parse_input_spec("x:float32:-1,2048")],
    )
    demo_registry.push("wide", Wide(2048, 8).state_dict(), class_name="Wide")
    size = demo_registry.checkpoints.resolve("wide").size  # 128 MiB of float32
    server = start(demo_registry)
    try:
        with ModelClient(server.target) as client:
            client.load("doubler")  # warm every code path first
            before = rss()
            peak = [before]
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    peak.append(psutil.Process().memory_info().rss)
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample)
            sampler.start()
            client.load("wide")
            sampling.set()
            sampler.join()
            after_load = rss()
            client.unload("wide")
            after_unload = rss()
    finally:
        server.stop()
    assert after_load - before > 0.8 * size
    assert max(peak) - before < 1.5 * size, (max(peak) - before) / size
    assert after_unload - before < 0.25 * size, (after_unload - before) / size


def test_unload_waits_for_requests_in_flight(demo_registry: Registry) -> None:
    # The forward pass (1 s) must outlast an unload's own work (a full GC: ~0.2 s), or an
    # unload that did not wait would still find the request done.
    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 1.0}, [parse_input_spec("x:float32:-1,2")]
    )
    from tests.models import SlowNet

    demo_registry.push("slow", SlowNet().state_dict(), class_name="Slow")
    server = start(demo_registry)
    try:
        with ModelClient(server.target) as client:
            client.load("slow")
            batcher = server.app.cache.peek("slow").batcher  # type: ignore[union-attr]
            result: list[np.ndarray] = []
            client.metadata("slow")  # cached: the infer below goes straight to ModelInfer
            pending = threading.Thread(
                target=lambda: result.append(client.infer("slow", np.ones(2, np.float32)))
            )
            pending.start()
            in_flight(batcher)  # the unload below must not overtake the request
            client.unload("slow")
            # Unload returned: the request was answered by the model it unloaded, and no
            # lazy load brought the model back for it.
            assert batcher.stats().success == 1 and loaded(server) == []
            pending.join(timeout=10)
        assert len(result) == 1 and result[0].shape == (2,)
        assert torch.isfinite(torch.from_numpy(result[0])).all()
    finally:
        server.stop()


def in_flight(batcher: DynamicBatcher) -> None:
    """Wait until a request reached the batcher and its forward pass started."""
    give_up = time.monotonic() + 10
    while not (batcher.stats().requests == 1 and batcher.stats().queued == 0):
        assert time.monotonic() < give_up, "the request never reached the model"
        time.sleep(0.005)


def test_one_models_alias_trouble_does_not_stop_the_others_refresh(
    demo_registry: Registry,
) -> None:
    demo_registry.push("mlp", demo_registry.state_dict(demo_registry.checkpoints.resolve("mlp")))
    server = start(demo_registry)
    try:
        with ModelClient(server.target) as client:
            client.infer("mynet", np.zeros((3, 8, 8), np.float32))  # mynet:production -> 1
            client.infer("mlp", np.zeros(784, np.float32))  # mlp:production -> 1
            # mynet's alias disappears: its refresh fails; mlp's move must still be seen.
            demo_registry.checkpoints.unset_alias("mynet", "production")
            demo_registry.checkpoints.delete("mynet", 1)
            demo_registry.checkpoints.set_alias("mlp", "production", 2)
            server.run(server.app.cache.refresh_aliases())
            assert "mlp:2" in loaded(server) and "mlp:1" not in loaded(server)
            assert "mynet:1" in loaded(server)  # kept serving what it had
    finally:
        server.stop()


def test_a_failed_load_is_remembered_and_evicts_nothing_again(demo_registry: Registry) -> None:
    demo_registry.classes.register(
        "Broken",
        "tests.models:BrokenWarmup",
        {"features": 64},
        [parse_input_spec("x:float32:-1,64")],
    )
    from tests.models import BrokenWarmup

    broken = push_unchecked(demo_registry, "broken", BrokenWarmup(64).state_dict(), "Broken")
    mynet = demo_registry.checkpoints.resolve("mynet")
    # Room for mynet, but not for mynet and broken together: loading broken would evict mynet.
    budget_mb = (mynet.size + broken.size // 2) / 2**20
    server = start(demo_registry, memory_budget_mb=budget_mb)
    try:
        with ModelClient(server.target) as client:
            with pytest.raises(UnavailableError, match="warm-up"):
                client.load("broken")
            client.load("mynet")
            for _ in range(3):
                with pytest.raises(UnavailableError, match="warm-up"):
                    client.load("broken")  # the remembered failure, without evicting mynet
            assert loaded(server) == ["mynet:1"]
    finally:
        server.stop()


def test_unload_during_a_load_is_not_undone_when_the_load_finishes(
    demo_registry: Registry,
) -> None:
    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 0.5}, [parse_input_spec("x:float32:-1,2")]
    )
    from tests.models import SlowNet

    demo_registry.push("slow", SlowNet(0.5).state_dict(), class_name="Slow")
    server = start(demo_registry)
    try:
        with ModelClient(server.target) as client:
            loading = threading.Thread(target=client.load, args=("slow",))
            loading.start()
            deadline = time.monotonic() + 10
            while not server.app.cache.is_loading("slow", 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            client.unload("slow")  # returns after the warm-up (0.5 s) finished
            loading.join(timeout=10)
            assert loaded(server) == []
            assert not client.ready("slow")
    finally:
        server.stop()
