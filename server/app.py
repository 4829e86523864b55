"""The grpc.aio front end (`--frontend grpc`) and `serve`, which runs the chosen front end."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import grpc
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from moduleserve.server.config import ServerSettings
from moduleserve.server.core import Core
from moduleserve.server.engine.cache import ModelCache
from moduleserve.server.engine.devices import DeviceExecutors
from moduleserve.server.jobs.supervisor import WorkerProcesses
from moduleserve.server.metrics import EngineCollector, MetricsServer
from moduleserve.server.security import server_credentials
from moduleserve.server.serve import banner, write_port_file
from moduleserve.server.status import DecodeErrorInterceptor
from moduleserve.server.workers import (
    PortInUseError,
    PortMode,
    check_port_free,
    start_workers,
    stop_workers,
)

logger = logging.getLogger(__name__)


class App:
    """One grpc.aio server over a `Core`, with its metrics endpoint and job workers.

    The fallback front end (`--frontend grpc`), and the in-process server of the tests."""

    def __init__(
        self,
        settings: ServerSettings,
        executors: DeviceExecutors | None = None,
        port_mode: PortMode = "own",
    ) -> None:
        self.settings = settings
        self.port_mode = port_mode
        self.core = Core(settings, executors)
        self.registry = self.core.registry
        self.cache = self.core.cache
        self.device = self.core.device
        self.job_workers = WorkerProcesses(settings, settings.job_workers)
        self.server = self._build_server()
        self.port = 0
        self.metrics_port = 0
        self._metrics: MetricsServer | None = None

    def _build_server(self) -> grpc.aio.Server:
        limit = self.settings.max_message_mb * 1024 * 1024
        limit = min(limit, 2**31 - 1)  # gRPC takes a signed 32-bit byte count
        server = grpc.aio.server(
            interceptors=[DecodeErrorInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC sets SO_REUSEPORT unless told not to, and then a second server on
                # the same port binds silently and takes half the connections.
                ("grpc.so_reuseport", int(self.port_mode != "own")),
            ],
        )
        self.core.add_services(server)
        return server

    async def start(self) -> int:
        """Check the schema, bind, start serving; returns the gRPC port.

        On failure everything started so far is stopped again before the error propagates
        (a started gRPC server left to the garbage collector schedules its shutdown on a
        loop that is closed by then)."""
        try:
            return await self._start()
        except BaseException:
            try:
                await self.stop(grace=0)
            except Exception:  # the start-up error is the one to report
                logger.exception("cleaning up after a failed start failed")
            raise

    async def _start(self) -> int:
        log_registry(self.settings)
        await self.core.check()
        self._bind()
        self._metrics, self.metrics_port = await start_metrics(self.settings, self.cache)
        await self.server.start()
        await self.core.start()
        if self.settings.job_workers:
            self.job_workers.start()
        logger.info(
            "gRPC listening on %s:%d (device %s)", self.settings.host, self.port, self.device
        )
        return self.port

    def _bind(self) -> None:
        """Bind the gRPC port: refused when another process listens there."""
        host, port = self.settings.host, self.settings.grpc_port
        if self.port_mode != "join":  # a worker joins the port its parent checked and holds
            check_port_free(host, port, "--grpc-port")
        address = f"{host}:{port}"
        try:
            if self.settings.tls_cert and self.settings.tls_key:
                creds = server_credentials(self.settings.tls_cert, self.settings.tls_key)
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # gRPC's "Failed to bind": taken since the check, or
            # an address that is not this machine's
            raise OSError(f"could not listen on {address}: in use, or not a local address") from exc
        if self.port == 0:
            raise OSError(f"could not listen on {address}")

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish, then unload and release everything."""
        await self.core.begin_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s if grace is None else grace)
        await self.core.close()
        await self.job_workers.stop()
        if self._metrics is not None:
            await self._metrics.close()


def log_registry(settings: ServerSettings) -> None:
    logger.info(
        "registry: database %s, blob store %s%s",
        redact_url(settings.database_url()),
        settings.store.resolve(),
        f" (settings from {settings.config_file})" if settings.config_file else "",
    )


async def start_metrics(
    settings: ServerSettings, cache: ModelCache
) -> tuple[MetricsServer | None, int]:
    """The Prometheus endpoint on its own port (None, 0 with --no-metrics)."""
    port = settings.metrics_port
    if port is None:
        return None, 0
    registry = CollectorRegistry()
    registry.register(EngineCollector(cache))
    metrics = MetricsServer(registry)
    try:
        return metrics, await metrics.start(settings.host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(port, "--metrics-port (or --no-metrics)") from None
        raise


def redact_url(url: str) -> str:
    """A database URL fit for a log line: its password replaced by `***`."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


async def serve_grpc(
    settings: ServerSettings,
    port_file: Path | None = None,
    workers: int = 1,
    argv: Sequence[str] = (),
    join_port: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully (with `workers - 1` extra
    processes sharing the port, started from `argv` once the port is known; `join_port`:
    this process is such a worker)."""
    mode: PortMode = "join" if join_port else "share" if workers > 1 else "own"
    app = App(settings, port_mode=mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await app.start()
    extra: list[subprocess.Popen[bytes]] = []
    try:  # whatever fails from here on, the server and its processes are stopped
        extra = start_workers(workers - 1, argv, port) if workers > 1 else []
        if port_file is not None:
            write_port_file(port_file, port)
        models = await asyncio.to_thread(app.registry.checkpoints.list_models)
        print(banner(settings, port, app.metrics_port, [m.name for m in models]), flush=True)
        await stop.wait()
        logger.info(
            "shutting down: finishing in-flight requests (grace %.1fs)", settings.shutdown_grace_s
        )
    finally:
        await app.stop()
        codes = stop_workers(extra, settings.shutdown_grace_s + 30) if extra else []
    if any(codes):
        raise RuntimeError(f"worker processes exited with {codes}")
    logger.info("stopped")
