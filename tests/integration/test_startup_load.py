"""Models loaded before the server reports ready: --load MODEL[:REF], --load-all, the
config file's `load`, and the deprecated --preload."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry
from moduleserve.registry.demo.seed import DEMO_MODELS
from moduleserve.server.cli import build_parser
from moduleserve.server.config import ServerSettings
from moduleserve.server.startup import models_to_load
from tests.helpers import ServerThread, server_settings


@pytest.fixture
def served_settings(demo_registry: Registry) -> Iterator[list[ServerThread]]:
    """Servers started by a test, stopped at its end."""
    servers: list[ServerThread] = []
    yield servers
    for server in servers:
        server.stop()


def start(registry: Registry, servers: list[ServerThread], **overrides: object) -> ModelClient:
    settings = server_settings(
        registry.settings.database_url(), registry.settings.store, **overrides
    )
    servers.append(ServerThread(settings))
    return ModelClient(servers[-1].target)


def test_load_all_makes_every_model_ready_before_start_returns(
    demo_registry: Registry, served_settings: list[ServerThread]
) -> None:
    client = start(demo_registry, served_settings, load_all=True, lazy_load=False)

    names = [m.name for m in demo_registry.checkpoints.list_models()]
    assert {d.model for d in DEMO_MODELS} <= set(names)
    # Right after start: nothing asked for them since, and lazy loading is off.
    assert {name: client.ready(name) for name in names} == dict.fromkeys(names, True)
    loaded = served_settings[-1].app.cache.loaded()
    assert sorted(m.name for m in loaded) == sorted(names)


def test_load_takes_refs_and_loads_only_those(
    demo_registry: Registry, served_settings: list[ServerThread]
) -> None:
    demo_registry.push("mlp", demo_registry.state_dict(demo_registry.checkpoints.resolve("mlp")))
    client = start(demo_registry, served_settings, load=["mlp:1"], lazy_load=False)

    assert client.ready("mlp", "1")
    assert not client.ready("mlp", "2")
    assert not client.ready("mynet")


def test_models_to_load_lists_load_all_by_name_then_the_explicit_refs_once(
    demo_registry: Registry,
) -> None:
    demo_registry.checkpoints.delete("doubler", 1, force=True)  # a model with no version
    settings = server_settings(
        demo_registry.settings.database_url(),
        demo_registry.settings.store,
        load_all=True,
        load=["mynet:production", "mlp", "mynet:production"],
    )
    assert isinstance(settings, ServerSettings)

    refs = asyncio.run(models_to_load(settings, demo_registry))

    with_versions = [m.name for m in demo_registry.checkpoints.list_models() if m.versions]
    assert "doubler" not in with_versions
    assert refs == [*sorted(with_versions), "mynet:production"]


def test_the_config_file_and_the_environment_name_models_to_load(
    demo_registry: Registry,
    served_settings: list[ServerThread],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "moduleserve.toml"
    config.write_text('load = ["mlp"]\n')
    monkeypatch.setenv("MODULESERVE_CONFIG", str(config))
    client = start(demo_registry, served_settings, lazy_load=False)

    assert client.ready("mlp")
    assert not client.ready("mynet")

    monkeypatch.setenv("MODULESERVE_LOAD", '["mynet:1"]')  # the environment wins over the file
    monkeypatch.setenv("MODULESERVE_LOAD_ALL", "true")
    assert (ServerSettings().load, ServerSettings().load_all) == (["mynet:1"], True)


def test_a_misspelt_config_key_is_refused_with_the_right_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "moduleserve.toml"
    config.write_text("lod_all = true\n")
    monkeypatch.setenv("MODULESERVE_CONFIG", str(config))

    with pytest.raises(ValueError, match="unknown setting 'lod_all'; did you mean 'load_all'"):
        ServerSettings()


def test_preload_still_works_as_the_hidden_former_name_of_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "moduleserve.toml"
    config.write_text('preload = ["mynet"]\n')
    monkeypatch.setenv("MODULESERVE_CONFIG", str(config))

    assert ServerSettings(load=["mlp"]).load == ["mlp", "mynet"]
    args = build_parser().parse_args(["--preload", "mlp:1", "--load", "mynet"])
    assert (args.preload, args.load) == (["mlp:1"], ["mynet"])
    assert "--preload" not in build_parser().format_help()
