"""Shared test helpers (imported by tests, never from a conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch
from torch import nn

from moduleserve.client.introspection_results import Totals
from moduleserve.registry.api import Registry
from moduleserve.registry.cli import main as registry_cli
from moduleserve.registry.config import RegistrySettings
from moduleserve.registry.entities import Version

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "MODULESERVE_TEST_POSTGRES_URL"
DEMO_PREFIXES = ["moduleserve.registry.demo", "tests.models"]


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


def seeded_registry(folder: Path) -> Registry:
    """A SQLite registry in `folder` seeded with the demo models plus the tests' Doubler."""
    from moduleserve.registry.classes import parse_input_spec
    from moduleserve.registry.demo.seed import seed_demo
    from tests.models import Doubler

    reg = Registry(registry_settings(f"sqlite:///{folder / 'registry.db'}", folder / "store"))
    reg.init()
    seed_demo(reg)
    reg.classes.register(
        "Doubler", "tests.models:Doubler", {}, [parse_input_spec("x:float32:-1,1")]
    )
    reg.push("doubler", Doubler().state_dict(), class_name="Doubler")
    return reg


def push_unchecked(
    registry: Registry, model: str, tensors: dict[str, torch.Tensor], class_name: str
) -> Version:
    """Store a version without `push`'s checks, as a release before them did (or as if the
    class's code changed since): for tests of what the server does with a version that
    cannot serve, such as one whose warm-up fails."""
    from moduleserve.registry.formats import encode_tensors

    data = encode_tensors(tensors)
    return registry.checkpoints.add_version(model, registry.blobs.put(data), len(data), class_name)


def subprocess_env(db_url: str, store: Path) -> dict[str, str]:
    """Environment for a child process that opens the same registry."""
    env = dict(os.environ)
    env.update(
        {
            "MODULESERVE_DB": db_url,
            "MODULESERVE_STORE": str(store),
            "MODULESERVE_ALLOWED_CLASS_PREFIXES": '["moduleserve.registry.demo", "tests.models"]',
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

        from moduleserve.server.app import App

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.app: App = self.run(_make_app(settings))
        self.port: int = self.run(self.app.start())
        self.metrics_port = self.app.metrics_port
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
    from moduleserve.server.app import App

    return App(settings)  # type: ignore[arg-type]


def server_settings(db_url: str, store: Path, **overrides: object) -> object:
    """ServerSettings for tests: ephemeral port, no metrics endpoint, test classes allowed."""
    from moduleserve.server.config import ServerSettings

    values: dict[str, object] = {
        "db": db_url,
        "store": store,
        "grpc_port": 0,
        "metrics_port": None,
        "allowed_class_prefixes": DEMO_PREFIXES,
        "alias_refresh_s": 0.2,
        "job_workers": 0,
    }
    values.update(overrides)
    return ServerSettings(**values)


def assert_stats_match(stats: object, tensor: object) -> None:
    """Every statistic of an introspection result against torch's own float64 computation
    over the finite values (the client's and the plain functions' results alike)."""
    import pytest

    def approx(value: float) -> object:
        return pytest.approx(value, rel=1e-9, abs=1e-12)

    assert stats is not None
    t = tensor.detach().double().reshape(-1)  # type: ignore[attr-defined]
    finite = t[torch.isfinite(t)]
    assert stats.finite == finite.numel()  # type: ignore[attr-defined]
    assert stats.nan_count == int(torch.isnan(t).sum())  # type: ignore[attr-defined]
    assert stats.inf_count == int(torch.isinf(t).sum())  # type: ignore[attr-defined]
    assert stats.zero_fraction == approx(float((t == 0).double().mean()))  # type: ignore[attr-defined]
    assert stats.mean == approx(float(finite.mean()))  # type: ignore[attr-defined]
    assert stats.min == float(finite.min())  # type: ignore[attr-defined]
    assert stats.max == float(finite.max())  # type: ignore[attr-defined]
    assert stats.norm == approx(float(finite.norm()))  # type: ignore[attr-defined]
    expected_std = float(finite.std()) if finite.numel() > 1 else None
    assert stats.std == (approx(expected_std) if expected_std is not None else None)  # type: ignore[attr-defined]


def approx(value: float) -> Any:
    """Float64 figures agree with torch to rounding; abs covers values near zero."""
    return pytest.approx(value, rel=1e-9, abs=1e-12)


def randomize_batchnorm(module: nn.Module, batches: int) -> None:
    """Give every BatchNorm non-trivial running statistics and a batch count."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            assert sub.running_mean is not None and sub.running_var is not None
            sub.running_mean.normal_()
            sub.running_var.uniform_(0.5, 2.0)
            sub.num_batches_tracked.fill_(batches)  # type: ignore[union-attr]  # tracked


def expected_totals(module: nn.Module) -> Totals:
    """Totals from parameters()/buffers(), which already count a shared tensor once."""
    params, buffers = list(module.parameters()), list(module.buffers())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return Totals(
        parameters=total,
        trainable=trainable,
        frozen=total - trainable,
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        parameter_tensors=len(params),
        buffer_elements=sum(b.numel() for b in buffers),
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
        buffer_tensors=len(buffers),
    )


class Cli:
    """Runs `moduleserve-registry` in-process against one registry and captures its output."""

    def __init__(self, db_url: str, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.base = [
            "--db",
            db_url,
            "--store",
            str(store),
            "--allow-prefix",
            "moduleserve.registry.demo",
        ]
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        code = registry_cli([*self.base, *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> object:
        code, out, err = self("--json", *args)
        assert code == 0, err
        return json.loads(out)


class EnvoyServer:
    """The real server under its Envoy front end (pyvoy), on an ephemeral port: the same
    `target` as ServerThread, for wire tests parametrized over front ends. Envoy runs as a
    child process with the application inside (there is no in-process `app` to reach);
    job workers, when the settings ask for them, are children of this process, as under
    `moduleserve-server`. `app` serves another ASGI application (a test's) the same way."""

    def __init__(self, settings: Any, workers: int = 1, app: str | None = None) -> None:
        import asyncio
        import threading

        from moduleserve.server.frontends.envoy import APP, EnvoyFrontEnd
        from moduleserve.server.jobs.supervisor import WorkerProcesses

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._front = EnvoyFrontEnd(settings, workers, app or APP)
        self._jobs = WorkerProcesses(settings, settings.job_workers)
        self.port: int = self.run(self._front.start(timeout=120))
        if settings.job_workers:
            self._loop.call_soon_threadsafe(self._jobs.start)
        self.metrics_port = self._front.metrics_port
        self.target = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.target}"

    def run(self, coro: Any, timeout: float = 150) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def pid(self) -> int:
        """The (first) Envoy process: the one that holds the models."""
        return self._front.processes[0].pid

    @property
    def envoy_log(self) -> Path:
        """Envoy's own output (its log, and what Python inside it writes to stderr); the
        application's log lines go to this process's stderr instead."""
        return self._front.processes[0].log_file

    def stop(self) -> None:
        """Drain and stop Envoy (and the job workers), then end the loop thread."""
        try:
            codes = self.run(self._front.stop())
            self.run(self._jobs.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
        assert not any(codes), f"Envoy exited with {codes}"
