"""The Open Inference Protocol servicer (KServe V2 / Triton gRPC): a protobuf codec over
`DataPlane`, nothing else.

Registered under Triton's wire name `inference.GRPCInferenceService` by a generic
handler, since our messages live in the `moduleserve.oip.v2` protobuf package. The same
handler objects serve both front ends (grpc.aio, and the ASGI gRPC codec under Envoy).
"""

from __future__ import annotations

import time

import grpc

from moduleserve.client.oip import OIP_SERVICE, oip_methods
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.convert import has_typed_contents, inputs_from_pb, outputs_to_pb
from moduleserve.server.convert_meta import (
    model_config_to_pb,
    model_metadata_to_pb,
    statistics_to_pb,
)
from moduleserve.server.dataplane import DataPlane
from moduleserve.server.status import map_errors

Context = grpc.aio.ServicerContext


class InferenceServicer:
    """GRPCInferenceService: decode the message, call the data plane, encode its answer."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @map_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @map_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    @map_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        ready = await self.plane.model_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @map_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        meta = self.plane.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=meta.extensions
        )

    @map_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        meta = await self.plane.model_metadata(request.name, request.version)
        return model_metadata_to_pb(meta.model, meta.module_class)

    @map_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        config = await self.plane.model_config(request.name, request.version)
        loaded = config.loaded
        return model_config_to_pb(
            config.version,
            config.module_class,
            config.batching,
            loaded.compute if loaded else "",
            loaded.forward_ms if loaded else None,
        )

    @map_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        result = await self.plane.infer(
            request.model_name,
            request.model_version,
            inputs_from_pb(request),
            requested=[o.name for o in request.outputs],
            deadline=_deadline(request, context),
            priority=_int_param(request, "priority"),
        )
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(result.version), id=request.id
        )
        outputs_to_pb(response, result.outputs, _wants_raw(request, result.outputs))
        return response

    @map_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        found = await self.plane.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(
            model_stats=[statistics_to_pb(s.model, s.version, s.stats) for s in found]
        )

    @map_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in await self.plane.index(ready_only=request.ready):
            response.models.add(
                name=entry.model, version=str(entry.version), state=entry.state, reason=entry.reason
            )
        return response

    @map_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        ref = request.parameters["version"].string_param if "version" in request.parameters else ""
        await self.plane.load(request.model_name, ref)
        return pb.RepositoryModelLoadResponse()

    @map_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.plane.unload(request.model_name)
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
