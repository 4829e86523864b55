"""Where a model computes (`compute`: auto, inline, thread): the choice made at load, logged,
and the answers identical either way, through a real server."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.server.engine.devices import INLINE_MAX_FORWARD_S, choose_compute
from tests.helpers import ServerThread, server_settings
from tests.models import SlowNet

CPU = torch.device("cpu")


def start(registry: Registry, **overrides: object) -> ServerThread:
    return ServerThread(
        server_settings(registry.settings.database_url(), registry.settings.store, **overrides)
    )


def push_slow(registry: Registry) -> None:
    """A model whose forward pass sleeps 10 times the inline limit: slow by construction."""
    delay = 10 * INLINE_MAX_FORWARD_S
    registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": delay}, [parse_input_spec("x:float32:-1,2")]
    )
    registry.push("slow", SlowNet(delay).state_dict(), class_name="Slow")


def compute_of(server: ServerThread, model: str) -> str:
    loaded = server.app.cache.peek(model)
    assert loaded is not None
    assert loaded.batcher.inline == (loaded.compute == "inline")
    return loaded.compute


def test_auto_runs_a_tiny_model_inline_and_says_so(
    demo_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moduleserve.server.engine.cache")
    server = start(demo_registry, batching={"max_batch_size": 4})
    try:
        with ModelClient(server.target) as client:
            client.load("doubler")
            assert client.infer("doubler", np.array([4.0], np.float32)).tolist() == [9.0]
        assert compute_of(server, "doubler") == "inline"
        loaded = server.app.cache.peek("doubler")
        assert loaded is not None and loaded.forward_ms is not None
    finally:
        server.stop()
    assert any(
        r.getMessage().startswith("doubler:1 computes inline (forward ")
        and "at batch 4, under 1 ms)" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_auto_sends_a_slow_model_to_the_compute_thread(demo_registry: Registry) -> None:
    push_slow(demo_registry)
    server = start(demo_registry)
    try:
        with ModelClient(server.target) as client:
            client.load("slow")
            assert client.infer("slow", np.ones(2, np.float32)).shape == (2,)
        assert compute_of(server, "slow") == "thread"
        loaded = server.app.cache.peek("slow")
        assert loaded is not None and loaded.forward_ms is not None
        assert loaded.forward_ms >= 10 * INLINE_MAX_FORWARD_S * 1000  # it sleeps that long
    finally:
        server.stop()


@pytest.mark.parametrize("setting", ["thread", "inline"])
def test_forced_setting_wins_and_answers_match(demo_registry: Registry, setting: str) -> None:
    server = start(demo_registry, compute=setting)
    try:
        with ModelClient(server.target) as client:
            client.load("doubler")
            x = np.arange(6, dtype=np.float32).reshape(6, 1)
            results: list[np.ndarray] = []
            threads = [
                threading.Thread(target=lambda v=v: results.append(client.infer("doubler", v)))
                for v in x
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=10)
        assert sorted(r.item() for r in results) == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
        assert compute_of(server, "doubler") == setting
        loaded = server.app.cache.peek("doubler")
        assert loaded is not None and loaded.forward_ms is None  # not timed when forced
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("setting", "device", "forward_s", "mode"),
    [
        ("auto", CPU, INLINE_MAX_FORWARD_S / 10, "inline"),
        ("auto", CPU, INLINE_MAX_FORWARD_S, "thread"),
        ("auto", CPU, None, "thread"),
        ("auto", torch.device("cuda"), INLINE_MAX_FORWARD_S / 10, "thread"),
        ("thread", CPU, INLINE_MAX_FORWARD_S / 10, "thread"),
        ("inline", CPU, 1.0, "inline"),
    ],
)
def test_choose_compute(setting: str, device: torch.device, forward_s: float, mode: str) -> None:
    assert choose_compute(setting, device, forward_s)[0] == mode


def test_compute_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from moduleserve.server.cli import build_parser, settings_from
    from moduleserve.server.config import ServerSettings

    assert ServerSettings().compute == "auto"
    monkeypatch.setenv("MODULESERVE_COMPUTE", "thread")
    assert ServerSettings().compute == "thread"
    assert settings_from(build_parser().parse_args(["--compute", "inline"])).compute == "inline"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--compute", "gpu"])
