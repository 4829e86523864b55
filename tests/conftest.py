"""Fixtures: registries on SQLite files and on the real PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moduleserve.registry.api import Registry
from tests.helpers import (
    EnvoyServer,
    ServerThread,
    postgres_schema,
    postgres_url,
    registry_settings,
    seeded_registry,
    server_settings,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    base = postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL configured (set MODULESERVE_TEST_POSTGRES_URL)")
    with postgres_schema(base) as url:
        yield url


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty blob store folder."""
    return tmp_path / "store"


@pytest.fixture
def registry(db_url: str, store: Path) -> Iterator[Registry]:
    """A migrated, empty registry."""
    reg = Registry(registry_settings(db_url, store))
    reg.init()
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Iterator[Registry]:
    """A migrated registry on SQLite only, for tests about the store rather than the database."""
    reg = Registry(registry_settings(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"))
    reg.init()
    yield reg
    reg.close()


@pytest.fixture
def demo_registry(tmp_path: Path) -> Iterator[Registry]:
    """A SQLite registry seeded with the demo models plus the tests' own classes."""
    reg = seeded_registry(tmp_path)
    yield reg
    reg.close()


@pytest.fixture(params=["grpc", "envoy"])
def served(request: pytest.FixtureRequest, demo_registry: Registry) -> Iterator[Any]:
    """A real server on an ephemeral port over the demo registry, once per front end:
    grpc.aio in this process (ServerThread) and Envoy as a child process (EnvoyServer)."""
    settings = server_settings(demo_registry.settings.database_url(), demo_registry.settings.store)
    server = ServerThread(settings) if request.param == "grpc" else EnvoyServer(settings)
    yield server
    server.stop()


@pytest.fixture
def served_inproc(demo_registry: Registry) -> Iterator[ServerThread]:
    """The grpc.aio server in this process, for tests that look inside it (`.app`)."""
    settings = server_settings(demo_registry.settings.database_url(), demo_registry.settings.store)
    server = ServerThread(settings)
    yield server
    server.stop()


@pytest.fixture(params=["grpc", "envoy"])
def trainer(request: pytest.FixtureRequest, demo_registry: Registry) -> Iterator[Any]:
    """A server with one job worker process, over the demo registry (SQLite), per front end."""
    settings = server_settings(
        demo_registry.settings.database_url(),
        demo_registry.settings.store,
        job_workers=1,
        job_poll_s=0.1,
        job_lease_s=3.0,
        max_message_mb=1,
    )
    server = ServerThread(settings) if request.param == "grpc" else EnvoyServer(settings)
    yield server
    server.stop()


class _AsyncioErrors(logging.Handler):
    """Collects what asyncio logs at ERROR: a task's exception nobody retrieved, a callback
    that raised. Those never reach the test that caused them on their own."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(self.format(record))


@pytest.fixture(autouse=True)
def _fail_on_asyncio_errors() -> Iterator[None]:
    """An exception in an asyncio task or callback (on any loop, any thread) fails the test."""
    handler = _AsyncioErrors()
    handler.setFormatter(logging.Formatter("%(message)s"))
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        yield
    finally:
        asyncio_logger.removeHandler(handler)
    if handler.seen:
        pytest.fail("asyncio logged errors:\n" + "\n".join(handler.seen), pytrace=False)
