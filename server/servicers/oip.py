"""The Open Inference Protocol servicer (KServe V2 / Triton gRPC): thin adapters only.

Registered under Triton's wire name `inference.GRPCInferenceService` by a generic
handler, since our messages live in the `moduleserve.oip.v2` protobuf package.
"""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import grpc

from moduleserve.client.oip import OIP_SERVICE, oip_methods
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.api import Registry
from moduleserve.registry.entities import ModuleClass, Version
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.names import parse_ref
from moduleserve.server.convert import has_typed_contents, inputs_from_pb, outputs_to_pb
from moduleserve.server.convert_meta import (
    model_config_to_pb,
    model_metadata_to_pb,
    statistics_to_pb,
)
from moduleserve.server.engine.cache import ModelCache
from moduleserve.server.inference import infer
from moduleserve.server.security import Authorizer
from moduleserve.server.status import map_errors

EXTENSIONS = [
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "model_configuration",
    "schedule_policy",
]

Context = grpc.aio.ServicerContext


def server_version() -> str:
    """The installed moduleserve version."""
    try:
        return package_version("moduleserve")
    except PackageNotFoundError:
        return "0+unknown"


class InferenceServicer:
    """GRPCInferenceService over the model cache and the registry."""

    def __init__(self, cache: ModelCache, registry: Registry, auth: Authorizer) -> None:
        self.cache = cache
        self.registry = registry
        self.auth = auth
        self.ready = False

    @map_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @map_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    @map_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        # Ready means loaded and warmed up; an unknown model is simply not ready (as Triton).
        return pb.ModelReadyResponse(
            ready=self.cache.peek(request.name, request.version) is not None
        )

    @map_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="moduleserve", version=server_version(), extensions=EXTENSIONS
        )

    @map_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        _require_name(request.name)
        _, module_class = await asyncio.to_thread(
            self._version_and_class, request.name, request.version
        )
        model = await asyncio.to_thread(self.registry.checkpoints.get_model, request.name)
        return model_metadata_to_pb(model, module_class)

    @map_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        _require_name(request.name)
        version, module_class = await asyncio.to_thread(
            self._version_and_class, request.name, request.version
        )
        return model_config_to_pb(
            version, module_class, self.cache.settings.batching_for(request.name)
        )

    def _version_and_class(self, model: str, ref: str) -> tuple[Version, ModuleClass]:
        """Resolve a ref and fetch its class in one worker-thread hop (both hit the database)."""
        version = self.registry.checkpoints.resolve(model, ref)
        return version, self.registry.module_class_of(version)

    @map_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        _require_name(request.model_name)
        inputs = inputs_from_pb(request)
        loaded, outputs = await infer(
            self.cache,
            request.model_name,
            request.model_version,
            inputs,
            requested=[o.name for o in request.outputs],
            deadline=_deadline(request, context),
            priority=_int_param(request, "priority"),
        )
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(loaded.version.version), id=request.id
        )
        outputs_to_pb(response, outputs, _wants_raw(request, outputs))
        return response

    @map_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.version:
            parse_ref(request.version)  # refuse a malformed version rather than match nothing
        loaded = [
            m
            for m in self.cache.loaded()
            if (not request.name or m.name == request.name)
            and (not request.version or str(m.version.version) == request.version)
        ]
        if request.name and not loaded:
            await asyncio.to_thread(self.registry.checkpoints.get_model, request.name)
        return pb.ModelStatisticsResponse(
            model_stats=[
                statistics_to_pb(m.name, m.version.version, m.batcher.stats()) for m in loaded
            ]
        )

    @map_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        models = await asyncio.to_thread(self.registry.checkpoints.list_models)
        response = pb.RepositoryIndexResponse()
        for model in models:
            for number in model.versions:
                state, reason = self._state(model.name, number)
                if request.ready and state != "READY":
                    continue
                response.models.add(
                    name=model.name, version=str(number), state=state, reason=reason
                )
        return response

    def _state(self, model: str, number: int) -> tuple[str, str]:
        if self.cache.peek(model, str(number)) is not None:
            return "READY", ""
        if self.cache.is_loading(model, number):
            return "LOADING", ""
        failure = self.cache.failure(model, number)
        if failure is not None:
            return "UNAVAILABLE", failure
        if not self.cache.settings.lazy_load:
            return "UNAVAILABLE", "unloaded (loads on RepositoryModelLoad only)"
        return "UNAVAILABLE", "unloaded (loads on first request or RepositoryModelLoad)"

    @map_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self.auth.check(context)
        _require_name(request.model_name)
        ref = request.parameters["version"].string_param if "version" in request.parameters else ""
        await self.cache.load(request.model_name, ref)
        return pb.RepositoryModelLoadResponse()

    @map_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self.auth.check(context)
        _require_name(request.model_name)
        if not await self.cache.unload(request.model_name):
            await asyncio.to_thread(self.registry.checkpoints.get_model, request.model_name)
        return pb.RepositoryModelUnloadResponse()


def oip_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """Every OIP method of `servicer`, under Triton's service name."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, request, response in oip_methods()
    }
    return grpc.method_handlers_generic_handler(OIP_SERVICE, handlers)


def _require_name(name: str) -> None:
    if not name:
        raise InvalidInputError("the request names no model")


def _int_param(request: pb.ModelInferRequest, key: str) -> int:
    if key not in request.parameters:
        return 0
    param = request.parameters[key]
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInputError(f"parameter {key!r} must be an integer, got {choice}")
    return int(getattr(param, choice))


def _deadline(request: pb.ModelInferRequest, context: Context) -> float | None:
    """The earlier of the gRPC deadline and the OIP `timeout` parameter (microseconds)."""
    now = time.monotonic()
    remaining = context.time_remaining()
    deadline = now + remaining if remaining is not None else None
    timeout_us = _int_param(request, "timeout")
    if timeout_us > 0:
        deadline = min(deadline or float("inf"), now + timeout_us / 1e6)
    return deadline


def _wants_raw(request: pb.ModelInferRequest, outputs: dict) -> bool:
    """Raw outputs when the request came raw, asked for binary data, or a type needs it."""
    if request.raw_input_contents:
        return True
    if any(
        o.parameters["binary_data"].bool_param
        for o in request.outputs
        if "binary_data" in o.parameters
    ):
        return True
    return not all(has_typed_contents(t.dtype) for t in outputs.values())
