"""Shared test helpers (imported by tests, never from a conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from registry.config import RegistrySettings

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "MODULESERVE_TEST_POSTGRES_URL"
DEMO_PREFIXES = ["registry.demo", "tests.models"]


def postgres_url() -> str | None:
    """The PostgreSQL URL CI sets, or None when no PostgreSQL is configured."""
    return os.environ.get(POSTGRES_ENV) or None


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh schema for one test; yields a URL whose search_path points at it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    sep = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{sep}options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def registry_settings(db_url: str, store: Path) -> RegistrySettings:
    """Settings for a test registry: the demo classes and the tests' own classes allowed."""
    return RegistrySettings(db=db_url, store=store, allowed_class_prefixes=DEMO_PREFIXES)


def subprocess_env(db_url: str, store: Path) -> dict[str, str]:
    """Environment for a child process that opens the same registry."""
    env = dict(os.environ)
    env.update(
        {
            "MODULESERVE_DB": db_url,
            "MODULESERVE_STORE": str(store),
            "MODULESERVE_ALLOWED_CLASS_PREFIXES": '["registry.demo", "tests.models"]',
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -c code` in a child process and return its result."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


class ServerThread:
    """A real moduleserve server on an ephemeral port, run by its own event loop in a thread,
    so that synchronous clients (tritonclient, ModelClient) can call it from a test."""

    def __init__(self, settings: object) -> None:
        import asyncio
        import threading

        from server.app import App

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.app: App = self.run(_make_app(settings))
        self.port: int = self.run(self.app.start())
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro: object, timeout: float = 60) -> object:
        """Run a coroutine on the server's loop and wait for its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Graceful stop, then end the loop and the thread."""
        try:
            self.run(self.app.stop(grace=1))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


async def _make_app(settings: object) -> object:
    # App builds grpc.aio objects, which bind to the running loop: build it on that loop.
    from server.app import App

    return App(settings)  # type: ignore[arg-type]


def server_settings(db_url: str, store: Path, **overrides: object) -> object:
    """ServerSettings for tests: ephemeral port, no metrics endpoint, test classes allowed."""
    from server.config import ServerSettings

    values: dict[str, object] = {
        "db": db_url,
        "store": store,
        "grpc_port": 0,
        "metrics_port": None,
        "allowed_class_prefixes": DEMO_PREFIXES,
        "alias_refresh_s": 0.2,
    }
    values.update(overrides)
    return ServerSettings(**values)
