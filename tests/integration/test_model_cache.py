"""The model cache: lazy and explicit loads, LRU under a memory budget, memory really freed."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psutil
import pytest
import sqlalchemy as sa
import torch

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import (
    FailedPreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import MyNet
from moduleserve.server.app import App
from moduleserve.server.engine.batcher import DynamicBatcher
from moduleserve.server.startup import StartupLoadError
from tests.helpers import ServerThread, push_unchecked, server_settings
from tests.models import GATES, DropsLastRow, Gate, Gated, Wide, gate


def start(registry: Registry, **overrides: object) -> ServerThread:
    return ServerThread(
        server_settings(registry.settings.database_url(), registry.settings.store, **overrides)
    )


def loaded(server: ServerThread) -> list[str]:
    return sorted(f"{m.name}:{m.version.version}" for m in server.app.cache.loaded())


def sizes_of(registry: Registry, *models: str) -> dict[str, int]:
    return {m: registry.checkpoints.resolve(m).size for m in models}


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


MLP_INPUT = np.zeros(784, np.float32)
IMAGE = np.zeros((3, 8, 8), np.float32)  # mynet's and nested's input


def test_least_recently_used_model_is_evicted_beyond_the_budget(
    demo_registry: Registry,
) -> None:
    sizes = {m: demo_registry.checkpoints.resolve(m).size for m in ("mynet", "nested", "mlp")}
    budget_mb = (sizes["mlp"] + sizes["nested"] + sizes["mynet"] // 2) / 2**20
    server = start(demo_registry, memory_budget_mb=budget_mb)
    try:
        with ModelClient(server.target) as client:
            client.infer("mlp", MLP_INPUT)  # loaded lazily, as every model here
            client.infer("nested", IMAGE)
            client.infer("mlp", MLP_INPUT)  # mlp is now the most recent
            client.infer("mynet", IMAGE)  # does not fit: the least recently used (nested) goes
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


def released(ref: weakref.ref[Any], what: str) -> None:
    """Wait until nothing holds `ref`'s object: a worker thread may drop its last frame a
    moment after the call that used it returned. An object in a reference cycle, with the
    collector disabled, is never released, and fails here."""
    give_up = time.monotonic() + 10
    while ref() is not None:
        assert time.monotonic() < give_up, f"{what} is still held 10 s after it was unloaded"
        time.sleep(0.001)


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
            module = weakref.ref(server.app.cache.peek("wide").module)  # type: ignore[union-attr]
            client.unload("wide")
            released(module, "the unloaded model")
            after_unload = rss()
    finally:
        server.stop()
    assert after_load - before > 0.8 * size
    assert max(peak) - before < 1.5 * size, (max(peak) - before) / size
    assert after_unload - before < 0.25 * size, (after_unload - before) / size


def test_unload_waits_for_requests_in_flight(demo_registry: Registry) -> None:
    # The forward pass (1 s) must outlast an unload's own work, or an unload that did not
    # wait would still find the request done.
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
            client.infer("mynet", IMAGE)  # lazily loaded: a load may evict it
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


# -- explicit loads are pinned -----------------------------------------------------------------

PINNED_OUT = (
    r"model '{model}' version {version} needs [\d.]+ MiB, but models loaded explicitly "
    r"\({pinned}\) hold [\d.]+ MiB of the [\d.]+ MiB memory budget; unload one of them or "
    r"raise --memory-budget-mb"
)


def test_a_lazy_load_never_evicts_a_model_loaded_at_start(demo_registry: Registry) -> None:
    sizes = sizes_of(demo_registry, "mlp", "nested")
    budget_mb = (sizes["mlp"] + sizes["nested"] // 2) / 2**20  # mlp, and half of nested
    server = start(demo_registry, load=["mlp"], memory_budget_mb=budget_mb)
    try:
        with ModelClient(server.target) as client:
            pattern = PINNED_OUT.format(model="nested", version=1, pinned="mlp:1")
            with pytest.raises(ResourceExhaustedError, match=pattern):
                client.infer("nested", IMAGE)
            assert loaded(server) == ["mlp:1"]
            assert client.health() == "SERVING"
            assert client.infer("doubler", np.array([1.0], np.float32)).tolist() == [3.0]
            assert loaded(server) == ["doubler:1", "mlp:1"]  # the room mlp leaves is used
    finally:
        server.stop()


def test_an_explicit_load_evicts_only_lazily_loaded_models_and_an_unload_unpins(
    demo_registry: Registry,
) -> None:
    sizes = sizes_of(demo_registry, "mlp", "nested")
    budget_mb = (sizes["mlp"] + sizes["nested"] // 2) / 2**20
    server = start(demo_registry, memory_budget_mb=budget_mb)
    try:
        with ModelClient(server.target) as client:
            client.infer("nested", IMAGE)  # loaded lazily
            client.load("mlp")  # explicitly: takes the room of the lazily loaded nested
            assert loaded(server) == ["mlp:1"]
            pattern = PINNED_OUT.format(model="nested", version=1, pinned="mlp:1")
            with pytest.raises(ResourceExhaustedError, match=pattern):
                client.load("nested")  # an explicit load evicts no pinned model either
            client.unload("mlp")
            client.infer("mlp", MLP_INPUT)  # loaded again, lazily: no longer pinned
            client.infer("nested", IMAGE)  # so this lazy load may evict it
            assert loaded(server) == ["nested:1"]
    finally:
        server.stop()


def test_a_pinned_version_stays_pinned_when_its_alias_moves(demo_registry: Registry) -> None:
    torch.manual_seed(7)
    demo_registry.push("mynet", MyNet().state_dict())  # version 2; production stays at 1
    demo_registry.classes.register(
        "Wide100", "tests.models:Wide", {"features": 100, "layers": 1},
        [parse_input_spec("x:float32:-1,100")],
    )  # fmt: skip
    demo_registry.push("wide", Wide(100, 1).state_dict(), class_name="Wide100")
    sizes = sizes_of(demo_registry, "mynet", "wide")
    # Room for both versions of mynet during the move, not for wide beside one of them.
    budget = 2 * sizes["mynet"] + 1000
    assert budget < sizes["mynet"] + sizes["wide"]
    server = start(demo_registry, memory_budget_mb=budget / 2**20, alias_refresh_s=3600)
    try:
        with ModelClient(server.target) as client:
            client.load("mynet")  # production: version 1, pinned
            demo_registry.checkpoints.set_alias("mynet", "production", 2)
            server.run(server.app.cache.refresh_aliases())
            assert loaded(server) == ["mynet:2"]
            pattern = PINNED_OUT.format(model="wide", version=1, pinned="mynet:2")
            with pytest.raises(ResourceExhaustedError, match=pattern):
                client.infer("wide", np.zeros(100, np.float32))
            assert loaded(server) == ["mynet:2"]
    finally:
        server.stop()


def test_load_all_beyond_the_budget_fails_the_start_instead_of_evicting(
    demo_registry: Registry,
) -> None:
    sizes = sizes_of(demo_registry, "mlp", "nested")
    settings = server_settings(
        demo_registry.settings.database_url(),
        demo_registry.settings.store,
        load_all=True,
        memory_budget_mb=(sizes["mlp"] + sizes["nested"] // 2) / 2**20,
    )

    async def start_fails() -> str:
        app = App(settings)  # type: ignore[arg-type]
        with pytest.raises(StartupLoadError) as err:
            await app.start()  # which stops whatever it started before it raises
        return str(err.value)

    # Loaded in name order (doubler, mlp, mynet, nested): mynet no longer fits beside mlp.
    assert re.fullmatch(
        "cannot load 'mynet' at start: "
        + PINNED_OUT.format(model="mynet", version=1, pinned="doubler:1, mlp:1"),
        asyncio.run(start_fails()),
    )


# -- an eviction drains with nothing held -------------------------------------------------------


def register_gated(registry: Registry, model: str, gate_name: str, features: int = 64) -> None:
    """A `Gated` model of a class of its own (whose kwargs name its gate)."""
    class_name = f"Gated{model.capitalize()}"
    registry.classes.register(
        class_name,
        "tests.models:Gated",
        {"gate": gate_name, "features": features},
        [parse_input_spec(f"x:float32:-1,{features}")],
    )
    registry.push(model, Gated(gate_name, features).state_dict(), class_name=class_name)


def fresh_gate(name: str) -> Gate:
    """A fresh, closed gate of that name."""
    GATES.pop(name, None)
    return gate(name)


def test_loads_are_admitted_while_an_evicted_model_drains(demo_registry: Registry) -> None:
    # Admission (choosing victims, promising room, refusing) holds nothing across a drain. A
    # load's warm-up still waits for the device's compute thread, which the held request
    # occupies here: what this shows is a refusal answered at once, not after the drain.
    register_gated(demo_registry, "held", "evicted")
    register_gated(demo_registry, "big", "never")
    register_gated(demo_registry, "big2", "never")
    sizes = sizes_of(demo_registry, "held", "big")
    budget_mb = (sizes["held"] + sizes["big"] // 2) / 2**20  # room for one of them
    held = fresh_gate("evicted")
    server = start(demo_registry, compute="thread", memory_budget_mb=budget_mb)
    answers: list[np.ndarray] = []
    x = np.arange(1, 65, dtype=np.float32)
    try:
        with ModelClient(server.target) as client, ModelClient(server.target, timeout=10) as quick:
            request = threading.Thread(target=lambda: answers.append(client.infer("held", x)))
            request.start()
            assert held.entered.wait(10), "the request never reached the model"
            loading = threading.Thread(target=client.load, args=("big",))
            loading.start()  # evicts held, whose request is still computing
            until(lambda: "held:1" not in loaded(server))
            # The room held leaves is promised to big while held drains: a lazy load that
            # needs it is told at once to retry.
            with pytest.raises(UnavailableError, match="while other models are loading; retry"):
                quick.infer("big2", np.zeros(64, np.float32))
            assert request.is_alive() and loading.is_alive()  # still draining
            held.release.set()
            loading.join(timeout=30)
            request.join(timeout=30)
            assert loaded(server) == ["big:1"]
    finally:
        held.release.set()
        server.stop()
    assert len(answers) == 1 and answers[0].tolist() == x.tolist()  # answered by held


def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until `condition()` holds (the server works on its own thread)."""
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "the server never got there"
        time.sleep(0.001)


# -- unloading frees the weights without a garbage collection on the event loop ----------------


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """The cyclic collector off: only reference counting frees anything, and no collection
    that some allocation triggers stalls the event loop at a random moment."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def module_of(server: ServerThread, model: str) -> weakref.ref[Any]:
    found = server.app.cache.peek(model)
    assert found is not None, f"{model} is not loaded"
    return weakref.ref(found.module)


def test_unloaded_evicted_and_replaced_models_are_freed_without_a_collection(
    demo_registry: Registry, no_automatic_gc: None
) -> None:
    demo_registry.classes.register(
        "DropsLastRow", "tests.models:DropsLastRow", {}, [parse_input_spec("x:float32:-1,2")]
    )
    demo_registry.push("droplast", DropsLastRow().state_dict(), class_name="DropsLastRow")
    torch.manual_seed(7)
    demo_registry.push("mynet", MyNet().state_dict())  # version 2; production stays at 1
    sizes = sizes_of(demo_registry, "mlp", "nested", "mynet")
    # Room for all of them and half a mynet more: moving mynet's alias evicts nested.
    budget_mb = (sizes["mlp"] + sizes["nested"] + 3 * sizes["mynet"] // 2 + 1000) / 2**20
    server = start(demo_registry, memory_budget_mb=budget_mb, alias_refresh_s=3600)
    try:
        with ModelClient(server.target) as client:
            client.infer("nested", IMAGE)  # lazily, the least recently used from here on
            client.load("mlp")
            client.infer("mlp", MLP_INPUT)
            client.infer("mynet", IMAGE)  # version 1, by the default alias
            with pytest.raises(FailedPreconditionError):  # its compute raised, with a traceback
                client.infer("droplast", np.zeros((3, 2), np.float32))
            nested, mlp = module_of(server, "nested"), module_of(server, "mlp")
            mynet, droplast = module_of(server, "mynet"), module_of(server, "droplast")

            demo_registry.checkpoints.set_alias("mynet", "production", 2)
            server.run(server.app.cache.refresh_aliases())
            assert loaded(server) == ["droplast:1", "mlp:1", "mynet:2"]
            released(mynet, "the version the alias moved away from")
            released(nested, "the evicted model")
            client.unload("mlp")
            released(mlp, "the unloaded model")
            client.unload("droplast")
            released(droplast, "the model whose batch failed")
    finally:
        server.stop()


PROBE = r"""
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
probes = []
with grpc.insecure_channel(sys.argv[1]) as channel:
    check = health_pb2_grpc.HealthStub(channel).Check
    check(health_pb2.HealthCheckRequest(), timeout=30)
    print("ready", flush=True)
    while not stop.is_set():
        started = time.monotonic()
        check(health_pb2.HealthCheckRequest(), timeout=30)
        probes.append((started, time.monotonic() - started))
        time.sleep(0.002)
print(json.dumps(probes), flush=True)
"""


def slow_collection(at_least_s: float = 0.2) -> tuple[list[object], float]:
    """Objects enough that one full collection takes `at_least_s` here (a server's big
    heap), and the time it took."""
    ballast: list[object] = []
    while True:
        started = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - started
        if took >= at_least_s or len(ballast) >= 3_000_000:
            return ballast, took
        ballast.extend([] for _ in range(500_000))


def test_health_answers_within_50_ms_while_a_model_unloads(
    demo_registry: Registry, no_automatic_gc: None
) -> None:
    register_gated(demo_registry, "held", "unloading", features=2)
    held = fresh_gate("unloading")
    ballast, collection_s = slow_collection()
    server = start(demo_registry, compute="thread")
    answers: list[np.ndarray] = []
    probe: subprocess.Popen[str] | None = None
    try:
        with ModelClient(server.target) as client:
            client.load("held")
            x = np.array([1.0, 2.0], np.float32)
            request = threading.Thread(target=lambda: answers.append(client.infer("held", x)))
            request.start()
            assert held.entered.wait(10), "the request never reached the model"
            # The health checker runs in a process of its own, as a kubelet's would.
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, server.target],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert probe.stdout is not None and probe.stdin is not None
            assert probe.stdout.readline() == "ready\n"
            unloading = threading.Thread(target=client.unload, args=("held",))
            began = time.monotonic()
            unloading.start()
            until(lambda: "held:1" not in loaded(server))
            time.sleep(0.1)  # probes go on while the unload waits for the held request
            held.release.set()
            unloading.join(timeout=30)
            ended = time.monotonic()
            request.join(timeout=30)
            time.sleep(0.05)  # and just after
            probe.stdin.close()
            probes = json.loads(probe.stdout.read())
            assert probe.wait(30) == 0
    finally:
        held.release.set()
        if probe is not None and probe.poll() is None:
            probe.kill()
        server.stop()
        del ballast
    assert not unloading.is_alive() and loaded(server) == []
    assert len(answers) == 1 and answers[0].tolist() == x.tolist()  # drained, not dropped
    during = [seconds for at, seconds in probes if at <= ended and at + seconds >= began]
    assert len(during) >= 10, f"only {len(during)} health checks while the model unloaded"
    slowest = max(during)
    assert slowest < 0.05, (
        f"a health check took {slowest * 1000:.0f} ms while a model unloaded "
        f"(one full collection takes {collection_s * 1000:.0f} ms here)"
    )


# -- the alias refresher: each trouble once per change of condition, a bug with its traceback ---

CACHE_LOG = "moduleserve.server.engine.cache"


def refresh(server: ServerThread, times: int) -> None:
    for _ in range(times):
        server.run(server.app.cache.refresh_aliases())


def complaints(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the cache logged at WARNING or above."""
    return [r for r in caplog.records if r.name == CACHE_LOG and r.levelno >= logging.WARNING]


def sqlite(registry: Registry, statement: str) -> None:
    """One statement on the registry's SQLite file behind the server's back."""
    path = sa.make_url(registry.settings.database_url()).database
    assert path is not None
    database = sqlite3.connect(path)
    try:
        database.execute(statement)
        database.commit()
    finally:
        database.close()


def test_an_alias_refresh_trouble_is_logged_once_per_change_of_condition(
    demo_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CACHE_LOG)
    server = start(demo_registry, alias_refresh_s=3600)  # refreshed by the test alone
    try:
        with ModelClient(server.target) as client:
            client.infer("mynet", IMAGE)  # by its default ref: production, version 1
        demo_registry.checkpoints.unset_alias("mynet", "production")
        demo_registry.checkpoints.delete("mynet", 1)  # the default ref resolves to nothing now
        refresh(server, 3)
        gone = [r.getMessage() for r in complaints(caplog)]
        assert len(gone) == 1 and gone[0].startswith("keeping mynet:default at version 1: ")

        sqlite(demo_registry, "ALTER TABLE aliases RENAME TO aliases_away")  # registry broken
        refresh(server, 3)
        sqlite(demo_registry, "ALTER TABLE aliases_away RENAME TO aliases")
        refresh(server, 3)  # back to the first condition: news again, once
        lines = [r.getMessage() for r in complaints(caplog)]
        assert len(lines) == 3, lines
        assert "the registry database is unavailable (no such table: aliases)" in lines[1]
        assert lines[2] == gone[0]
        assert all(r.levelno == logging.WARNING and r.exc_info is None for r in complaints(caplog))

        torch.manual_seed(7)
        demo_registry.push("mynet", MyNet().state_dict())  # version 2, the latest
        refresh(server, 3)
        assert len(complaints(caplog)) == 3  # nothing more to complain about
        assert "mynet:default resolves again" in caplog.messages
        assert loaded(server) == ["mynet:2"]
    finally:
        server.stop()


def test_an_unexpected_refresh_failure_is_logged_once_with_its_traceback(
    demo_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CACHE_LOG)
    demo_registry.push("mlp", demo_registry.state_dict(demo_registry.checkpoints.resolve("mlp")))
    server = start(demo_registry, alias_refresh_s=3600)
    try:
        with ModelClient(server.target) as client:
            client.infer("mynet", IMAGE)
            client.infer("mlp", MLP_INPUT)
        # A row the registry cannot read: resolving mynet raises a bare ValueError, no error
        # of ours. mlp's alias moves meanwhile.
        sqlite(demo_registry, "UPDATE versions SET created_at = 'garbage' WHERE id IN "
               "(SELECT versions.id FROM versions JOIN models ON models.id = model_id "
               "WHERE models.name = 'mynet')")  # fmt: skip
        demo_registry.checkpoints.set_alias("mlp", "production", 2)
        refresh(server, 3)
        (bug,) = complaints(caplog)
        assert bug.levelno == logging.ERROR
        assert bug.getMessage() == (
            "keeping mynet:default at version 1: its refresh failed unexpectedly"
        )
        assert bug.exc_info is not None and bug.exc_info[0] is ValueError  # the traceback
        assert loaded(server) == ["mlp:2", "mynet:1"]  # the others' refresh went on
    finally:
        server.stop()
