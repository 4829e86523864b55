"""The composition root: settings → registry → engine → servicers → gRPC server."""

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
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from moduleserve.client.oip import OIP_SERVICE
from moduleserve.client.pb import moduleserve_v1_pb2, moduleserve_v1_pb2_grpc, oip_v2_pb2
from moduleserve.registry.api import Registry
from moduleserve.server.config import ServerSettings
from moduleserve.server.engine.cache import ModelCache
from moduleserve.server.engine.devices import DeviceExecutors, resolve_device
from moduleserve.server.jobs.supervisor import WorkerProcesses
from moduleserve.server.metrics import EngineCollector, MetricsServer
from moduleserve.server.security import Authorizer, server_credentials
from moduleserve.server.servicers.introspection import IntrospectionServicer
from moduleserve.server.servicers.jobs import DatasetsServicer, JobsServicer
from moduleserve.server.servicers.oip import InferenceServicer, oip_handler
from moduleserve.server.startup import load_at_start, models_to_load
from moduleserve.server.status import DecodeErrorInterceptor
from moduleserve.server.workers import (
    PortInUseError,
    PortMode,
    check_port_free,
    start_workers,
    stop_workers,
)

logger = logging.getLogger(__name__)

OIP_PROTO_SERVICE = oip_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class App:
    """One running server: its registry, model cache, gRPC server and metrics endpoint."""

    def __init__(
        self,
        settings: ServerSettings,
        executors: DeviceExecutors | None = None,
        port_mode: PortMode = "own",
    ) -> None:
        self.settings = settings
        self.port_mode = port_mode
        self.device = resolve_device(settings.device)
        torch.set_num_threads(settings.torch_threads)
        self.registry = Registry(settings)
        self.executors = executors or DeviceExecutors()
        self.health = health.aio.HealthServicer()
        self.cache = ModelCache(
            self.registry, settings, self.executors, self.device, on_status=self._model_status
        )
        self.auth = Authorizer(settings.tokens, settings.read_tokens)
        self.job_workers = WorkerProcesses(settings, settings.job_workers)
        self.inference = InferenceServicer(self.cache, self.registry, self.auth)
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
        # Triton's wire name for existing clients, and our package's name for reflection users.
        handler = oip_handler(self.inference)
        server.add_generic_rpc_handlers([handler, _renamed(handler)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        moduleserve_v1_pb2_grpc.add_IntrospectionServicer_to_server(
            IntrospectionServicer(self.registry, self.cache), server
        )
        self.jobs = JobsServicer(self.registry, self.auth)
        moduleserve_v1_pb2_grpc.add_JobsServicer_to_server(self.jobs, server)
        moduleserve_v1_pb2_grpc.add_DatasetsServicer_to_server(
            DatasetsServicer(self.registry, self.auth), server
        )
        services = moduleserve_v1_pb2.DESCRIPTOR.services_by_name
        names = [
            OIP_SERVICE,
            OIP_PROTO_SERVICE,
            services["Introspection"].full_name,
            services["Jobs"].full_name,
            services["Datasets"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
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
        logger.info(
            "registry: database %s, blob store %s%s",
            redact_url(self.settings.database_url()),
            self.settings.store.resolve(),
            f" (settings from {self.settings.config_file})" if self.settings.config_file else "",
        )
        await asyncio.to_thread(self.registry.check_schema)
        self._bind()
        await self._start_metrics()
        await self.server.start()
        self.cache.start()
        await load_at_start(self.cache, await models_to_load(self.settings, self.registry))
        if self.settings.job_workers:
            self.job_workers.start()
        self.inference.ready = True
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(OIP_SERVICE, health_pb2.HealthCheckResponse.SERVING)
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

    async def _start_metrics(self) -> None:
        port = self.settings.metrics_port
        if port is None:
            return
        registry = CollectorRegistry()
        registry.register(EngineCollector(self.cache))
        self._metrics = MetricsServer(registry)
        try:
            self.metrics_port = await self._metrics.start(self.settings.host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(port, "--metrics-port (or --no-metrics)") from None
            raise

    async def _model_status(self, model: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(model, status)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish, then unload and release everything."""
        self.inference.ready = False
        self.jobs.closing.set()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s if grace is None else grace)
        await self.cache.close()
        await self.job_workers.stop()
        self.executors.shutdown()
        if self._metrics is not None:
            await self._metrics.close()
        self.registry.close()


def redact_url(url: str) -> str:
    """A database URL fit for a log line: its password replaced by `***`."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _renamed(handler: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
    """The same OIP methods under `moduleserve.oip.v2.GRPCInferenceService`."""
    prefix = f"/{OIP_SERVICE}/"

    class Renamed(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            method = details.method
            if not method.startswith(f"/{OIP_PROTO_SERVICE}/"):
                return None
            name = method.rsplit("/", 1)[1]
            return handler.service(_Details(prefix + name, details.invocation_metadata))

    return Renamed()


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: object) -> None:
        self.method = method
        self.invocation_metadata = metadata


async def serve(
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
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(str(port))
            tmp.replace(port_file)  # readers never see a half-written number
        models = await asyncio.to_thread(app.registry.checkpoints.list_models)
        print(_banner(settings, port, app.metrics_port, [m.name for m in models]), flush=True)
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


def _banner(settings: ServerSettings, port: int, metrics_port: int, models: list[str]) -> str:
    target = f"{settings.host}:{port}"
    metrics = f"http://{settings.host}:{metrics_port}/metrics" if metrics_port else "off"
    # A model this registry has (the demo's mynet when it is there), not one it may lack.
    example = "mynet" if "mynet" in models else (models[0] if models else None)
    infer = (
        f"  moduleserve --target {target} infer {example} --random\n"
        if example
        else "  (no models yet: moduleserve-registry push NAME FILE --class CLASS)\n"
    )
    return (
        f"moduleserve serving on {target} (metrics: {metrics}); try:\n"
        f"  moduleserve --target {target} models\n{infer}"
        "Ctrl-C stops it."
    )
