"""What every front end serves: registry, model cache, data plane, and the RPC handlers.

A front end (grpc.aio in `app.py`, or the ASGI gRPC codec under Envoy in
`frontends/asgi.py`) builds one `Core`, hands `add_services` its own server object, and
calls `start`/`stop` around serving. The handlers are grpc `RpcMethodHandler`s over thin
servicers, so one registration serves both front ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from moduleserve.client.oip import OIP_SERVICE
from moduleserve.client.pb import moduleserve_v1_pb2, moduleserve_v1_pb2_grpc, oip_v2_pb2
from moduleserve.registry.api import Registry
from moduleserve.server.config import ServerSettings
from moduleserve.server.dataplane import DataPlane
from moduleserve.server.engine.cache import ModelCache
from moduleserve.server.engine.devices import DeviceExecutors, resolve_device
from moduleserve.server.security import AccessGuard, Authorizer
from moduleserve.server.servicers.introspection import IntrospectionServicer
from moduleserve.server.servicers.jobs import DatasetsServicer, JobsServicer
from moduleserve.server.servicers.oip import InferenceServicer, oip_handler
from moduleserve.server.startup import load_at_start, models_to_load

logger = logging.getLogger(__name__)

OIP_PROTO_SERVICE = oip_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class HandlerRegistry(Protocol):
    """What `add_services` needs of a server: grpc.aio.Server has it, so has the ASGI codec."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None: ...

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None: ...


class Core:
    """One server's engine and handlers, independent of the wire that carries them."""

    def __init__(self, settings: ServerSettings, executors: DeviceExecutors | None = None) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        torch.set_num_threads(settings.torch_threads)
        self.registry = Registry(settings)
        self.executors = executors or DeviceExecutors()
        self.health = health.aio.HealthServicer()
        self.cache = ModelCache(
            self.registry, settings, self.executors, self.device, on_status=self._model_status
        )
        self.auth = Authorizer(settings.tokens, settings.read_tokens)
        self.plane = DataPlane(self.cache, self.registry)
        self.jobs = JobsServicer(self.registry)

    def add_services(self, server: HandlerRegistry) -> None:
        """Register every service: OIP (under both names), ours, health and reflection.

        Each handler goes through `AccessGuard`, which applies security.GRPC_ACCESS: no
        handler checks tokens itself."""
        server = AccessGuard(server, self.auth)
        # Triton's wire name for existing clients, and our package's name for reflection users.
        handler = oip_handler(InferenceServicer(self.plane))
        server.add_generic_rpc_handlers([handler, _renamed(handler)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        moduleserve_v1_pb2_grpc.add_IntrospectionServicer_to_server(
            IntrospectionServicer(self.registry, self.cache), server
        )
        moduleserve_v1_pb2_grpc.add_JobsServicer_to_server(self.jobs, server)
        moduleserve_v1_pb2_grpc.add_DatasetsServicer_to_server(
            DatasetsServicer(self.registry), server
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
        # The asyncio servicer on every front end (enable_server_reflection would pick the
        # threaded one for anything but a grpc.aio.Server).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names), server
        )

    async def check(self) -> None:
        """Refuse a registry whose schema this server does not know (before binding)."""
        await asyncio.to_thread(self.registry.check_schema)

    async def start(self) -> None:
        """Load what loads at start, then report ready."""
        self.cache.start()
        await load_at_start(self.cache, await models_to_load(self.settings, self.registry))
        self.plane.ready = True
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(OIP_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def begin_shutdown(self) -> None:
        """Report not ready and end job watches, before in-flight calls are let finish."""
        self.plane.ready = False
        self.jobs.closing.set()
        await self.health.enter_graceful_shutdown()

    async def close(self) -> None:
        """Unload every model and release the registry (after the front end stopped)."""
        await self.cache.close()
        self.executors.shutdown()
        self.registry.close()

    async def _model_status(self, model: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(model, status)


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
