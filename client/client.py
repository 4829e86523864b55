"""`ModelClient`: a friendly synchronous client for a moduleserve server.

    from client.client import ModelClient

    with ModelClient("127.0.0.1:8001") as client:
        y = client.infer("mynet", x)          # numpy in → numpy out; torch in → torch out

A single sample (no batch dimension) comes back without one; several named inputs
are passed as a dict (names from `metadata()`), several outputs come back as a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.errors import from_rpc_error
from client.oip import method_path, oip_methods
from client.pb import oip_v2_pb2 as pb

if TYPE_CHECKING:
    from client.jobs import DatasetInfo, JobsClient

MAX_MESSAGE_BYTES = 2**31 - 1
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
NUMPY_FOR_DATATYPE = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPE_FOR_NUMPY = {np.dtype(v): k for k, v in NUMPY_FOR_DATATYPE.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model: name, OIP datatype, shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What ModelMetadata says about a model."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class ModelEntry:
    """One registry version as the repository index reports it."""

    name: str
    version: str
    state: str
    reason: str


class ModelClient:
    """Synchronous client over one gRPC channel; close it (or use `with`) when done."""

    def __init__(
        self,
        target: str = "127.0.0.1:8001",
        *,
        token: str | None = None,
        timeout: float | None = 60.0,
        tls_ca: Path | None = None,
    ) -> None:
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.target = target
        self.timeout = timeout
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._calls: dict[str, Callable[..., Any]] = {
            name: self._channel.unary_unary(
                method_path(name),
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )
            for name, req, resp in oip_methods()
        }
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._model_info: dict[tuple[str, str], ModelInfo] = {}

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, for other stubs on the same connection."""
        return self._channel

    @property
    def jobs(self) -> JobsClient:
        """Fine-tuning jobs and datasets on the same channel, token and timeout."""
        from client.jobs import JobsClient  # client.jobs imports this module

        return JobsClient(self._channel, metadata=self._metadata, timeout=self.timeout)

    def upload_dataset(
        self, name: str, tensors: Mapping[str, Any], description: str = ""
    ) -> DatasetInfo:
        """Register named numpy arrays or torch tensors as a dataset (streamed in chunks)."""
        return self.jobs.upload_dataset(name, tensors, description)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Call one OIP method, turning failures into ModuleServeError subclasses."""
        with translate_errors():
            return self._calls[method](
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )

    # -- server and models -----------------------------------------------------------------

    def live(self) -> bool:
        """ServerLive."""
        return bool(self.call("ServerLive", pb.ServerLiveRequest()).live)

    def ready(self, model: str | None = None, version: str = "") -> bool:
        """ServerReady, or ModelReady when a model is named."""
        if model is None:
            return bool(self.call("ServerReady", pb.ServerReadyRequest()).ready)
        return bool(
            self.call("ModelReady", pb.ModelReadyRequest(name=model, version=version)).ready
        )

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of the server ("") or of one model: SERVING, NOT_SERVING, or
        SERVICE_UNKNOWN for a model this server has not loaded since it started."""
        try:
            reply: health_pb2.HealthCheckResponse = self._health.Check(  # type: ignore[attr-defined]  # stub omits HealthStub.Check
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def metadata(self, model: str, version: str = "") -> ModelInfo:
        """Inputs, outputs and versions of a model."""
        reply = self.call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version))
        info = ModelInfo(
            name=reply.name,
            versions=tuple(reply.versions),
            platform=reply.platform,
            inputs=tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in reply.inputs),
            outputs=tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in reply.outputs),
        )
        self._model_info[(model, version)] = info
        return info

    def models(self, ready_only: bool = False) -> list[ModelEntry]:
        """Every registry model version with its state (READY, LOADING, UNAVAILABLE)."""
        reply = self.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready_only))
        return [ModelEntry(m.name, m.version, m.state, m.reason) for m in reply.models]

    def load(self, model: str, version: str = "") -> None:
        """Load (and warm up) a model version now instead of on its first request."""
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if version:
            request.parameters["version"].string_param = version
        self.call("RepositoryModelLoad", request)

    def unload(self, model: str) -> None:
        """Unload every version of a model (requests in flight finish first)."""
        self.call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model))

    def statistics(self, model: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        """Triton-style statistics of the loaded models."""
        reply: pb.ModelStatisticsResponse = self.call(
            "ModelStatistics", pb.ModelStatisticsRequest(name=model, version=version)
        )
        return reply

    # -- inference -------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Any,
        *,
        version: str = "",
        outputs: Sequence[str] = (),
        timeout: float | None = None,
        priority: int = 0,
    ) -> Any:
        """Run the model on numpy arrays or torch tensors; returns the same kind."""
        info = self._model_info.get((model, version)) or self.metadata(model, version)
        named, as_torch = _named_inputs(info, inputs)
        single = _is_single_sample(info, named)
        if single:
            named = {name: array[None] for name, array in named.items()}
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for name, array in named.items():
            request.inputs.add(name=name, datatype=_datatype(name, array), shape=array.shape)
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        for name in outputs:
            request.outputs.add(name=name)
        if priority:
            request.parameters["priority"].int64_param = priority
        reply = self.call("ModelInfer", request, timeout=timeout)
        # Any: numpy arrays, or torch tensors below (torch is optional for the client).
        results: dict[str, Any] = {
            out.name: _decode(out, data)
            for out, data in zip(reply.outputs, reply.raw_output_contents, strict=True)
        }
        if single:
            results = {name: array[0] for name, array in results.items()}
        if as_torch:
            import torch

            results = {name: torch.from_numpy(array) for name, array in results.items()}
        return next(iter(results.values())) if len(results) == 1 else results


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise grpc.RpcError as the matching ModuleServeError subclass."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


def _named_inputs(info: ModelInfo, inputs: Any) -> tuple[dict[str, np.ndarray], bool]:
    if isinstance(inputs, Mapping):
        items = dict(inputs)
    elif len(info.inputs) == 1:
        items = {info.inputs[0].name: inputs}
    else:
        names = ", ".join(t.name for t in info.inputs)
        raise ValueError(f"model {info.name!r} takes several inputs ({names}): pass a dict")
    as_torch = any(type(v).__module__.startswith("torch") for v in items.values())
    return {name: _to_numpy(value) for name, value in items.items()}, as_torch


def _to_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        array: np.ndarray = value.detach().cpu().numpy()
        return array
    return np.asarray(value)


def _is_single_sample(info: ModelInfo, named: Mapping[str, np.ndarray]) -> bool:
    specs = {t.name: t for t in info.inputs}
    first = next(iter(named))
    spec = specs.get(first)
    return spec is not None and named[first].ndim == len(spec.shape) - 1


def _datatype(name: str, array: np.ndarray) -> str:
    datatype = DATATYPE_FOR_NUMPY.get(array.dtype)
    if datatype is None:
        raise ValueError(f"input {name!r}: numpy dtype {array.dtype} has no OIP datatype")
    return datatype


def _decode(out: pb.ModelInferResponse.InferOutputTensor, data: bytes) -> np.ndarray:
    dtype = NUMPY_FOR_DATATYPE.get(out.datatype)
    if dtype is None:
        raise ValueError(f"output {out.name!r}: datatype {out.datatype} is not supported here")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(out.shape)).copy()
