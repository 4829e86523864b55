"""`ModelClient`: a friendly synchronous client for a moduleserve server.

    from moduleserve.client.client import ModelClient

    with ModelClient("127.0.0.1:8001") as client:
        y = client.infer("mynet", x)          # numpy in → numpy out; torch in → torch out

A single sample (no batch dimension) comes back without one; several named inputs
are passed as a dict (names from `metadata()`), several outputs come back as a dict.
Lists and float64 arrays are cast to the model's datatypes, and batches larger than the
model's max_batch_size are sent in parts (see `ModelClient.infer`).
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

from moduleserve.client.errors import InvalidArgumentError, from_rpc_error
from moduleserve.client.oip import method_path, oip_methods
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.client.refs import split_ref  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from moduleserve.client.jobs import DatasetInfo, JobsClient

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
        self._max_rows: dict[tuple[str, str], int] = {}

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, for other stubs on the same connection."""
        return self._channel

    @property
    def jobs(self) -> JobsClient:
        """Fine-tuning jobs and datasets on the same channel, token and timeout."""
        from moduleserve.client.jobs import JobsClient  # client.jobs imports this module

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
        with translate_errors(self.target):
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
            raise from_rpc_error(exc, self.target) from None
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
        convert: bool = True,
        return_version: bool = False,
    ) -> Any:
        """Run the model on numpy arrays, lists or torch tensors; returns the same kind.

        `convert` casts inputs to the model's datatypes where no kind is lost (float64 or
        Python lists to float32, int64 to int32 when the values fit); False sends them as
        they are. An input one dimension short of the model's shape is one sample; one that
        does not fit a sample either is refused here, naming the shape given. More rows than
        the model's max_batch_size go as several requests (`timeout` applies to each) whose
        outputs are joined; every part is answered by the version the first part resolved
        to. `return_version` returns (outputs, version that answered), which shows alias moves.
        """
        info = self._model_info.get((model, version)) or self.metadata(model, version)
        named, as_torch = _named_inputs(info, inputs)
        if convert:
            named = {name: _convert(info, name, array) for name, array in named.items()}
        single = _check_shapes(info, named)
        if single:
            named = {name: array[None] for name, array in named.items()}
        rows = _rows(named)
        limit = (self._max_batch_size(model, version) if rows > 1 else 0) or rows
        if rows > limit:
            _check_batch(info, named)
        # Any: numpy arrays, or torch tensors below (torch is optional for the client).
        results: dict[str, Any]
        results, answered = self._infer_parts(
            model, version, named, limit, outputs, timeout, priority
        )
        if single:
            results = {name: array[0] for name, array in results.items()}
        if as_torch:
            import torch

            results = {name: torch.from_numpy(array) for name, array in results.items()}
        result = next(iter(results.values())) if len(results) == 1 else results
        return (result, answered) if return_version else result

    def _max_batch_size(self, model: str, version: str) -> int:
        """The model's max_batch_size from ModelConfig (0: no limit), asked once per ref."""
        key = (model, version)
        if key not in self._max_rows:
            reply = self.call("ModelConfig", pb.ModelConfigRequest(name=model, version=version))
            self._max_rows[key] = int(reply.config.max_batch_size)
        return self._max_rows[key]

    def _infer_parts(
        self,
        model: str,
        version: str,
        named: Mapping[str, np.ndarray],
        limit: int,
        outputs: Sequence[str],
        timeout: float | None,
        priority: int,
    ) -> tuple[dict[str, np.ndarray], str]:
        """Send `named` in parts of at most `limit` rows; returns the joined outputs and the
        version that answered (the first part's, which the later parts then ask for)."""
        rows = _rows(named)
        split = [named] if rows <= limit else _split_rows(named, rows, limit)
        parts: list[dict[str, np.ndarray]] = []
        for part in split:
            request = _infer_request(model, version, part, outputs, priority)
            reply = self.call("ModelInfer", request, timeout=timeout)
            version = reply.model_version or version
            parts.append(
                {
                    out.name: _decode(out, data)
                    for out, data in zip(reply.outputs, reply.raw_output_contents, strict=True)
                }
            )
        if len(parts) == 1:
            return parts[0], version
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}, version


@contextmanager
def translate_errors(target: str | None = None) -> Iterator[None]:
    """Re-raise grpc.RpcError as the matching ModuleServeError subclass (naming `target`
    when the server could not be reached)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, target) from None


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


def _convert(info: ModelInfo, name: str, array: np.ndarray) -> np.ndarray:
    """`array` in the datatype the model declares for input `name`, when no kind is lost."""
    spec = next((t for t in info.inputs if t.name == name), None)
    target = NUMPY_FOR_DATATYPE.get(spec.datatype) if spec else None
    if target is None or array.dtype == target:
        return array
    # same_kind: float64 -> float32 and int -> float, never float -> int (the server refuses).
    if not np.can_cast(array.dtype, target, casting="same_kind"):
        return array
    if np.issubdtype(target, np.integer) and array.size:
        bounds = np.iinfo(target)
        if array.min() < bounds.min or array.max() > bounds.max:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r}: values from {array.min()} to {array.max()} do not fit "
                f"model {info.name!r}'s datatype {spec.datatype if spec else ''}",
            )
    return array.astype(target)


def _check_shapes(info: ModelInfo, named: Mapping[str, np.ndarray]) -> bool:
    """True when the inputs are one sample each (the batch dimension left out).

    An input one dimension short of its batched shape is taken as one sample; when it does
    not fit one sample either, it is refused here, naming the shape given (the server
    would see the shape with the batch dimension added). Other shapes are the server's.
    """
    specs = {t.name: t.shape for t in info.inputs}
    kinds: dict[str, bool] = {}
    for name, array in named.items():
        spec = specs.get(name)
        if spec is None:
            continue  # an unknown name: the server's refusal lists the inputs
        kinds[name] = bool(spec) and spec[0] == -1 and array.ndim == len(spec) - 1
        if kinds[name] and not _fits(array.shape, spec[1:]):
            raise _shape_error(info, name, array.shape, spec)
    if len(set(kinds.values())) > 1:
        shapes = ", ".join(f"{name} {list(named[name].shape)}" for name in kinds)
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"inputs of model {info.name!r} mix one sample and a batch: {shapes}",
        )
    return any(kinds.values())


def _check_batch(info: ModelInfo, named: Mapping[str, np.ndarray]) -> None:
    """Refuse a batch that cannot fit before it is split (the parts would hide its shape)."""
    specs = {t.name: t.shape for t in info.inputs}
    for name, array in named.items():
        spec = specs.get(name)
        if spec is not None and not _fits(array.shape, spec):
            raise _shape_error(info, name, array.shape, spec)


def _shape_error(
    info: ModelInfo, name: str, shape: tuple[int, ...], spec: Sequence[int]
) -> InvalidArgumentError:
    one = f" (or {list(spec[1:])} for one sample)" if spec and spec[0] == -1 else ""
    return InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input {name!r} of model {info.name!r}: expected shape {list(spec)}{one}, "
        f"got {list(shape)}",
    )


def _fits(shape: tuple[int, ...], spec: Sequence[int]) -> bool:
    return len(shape) == len(spec) and all(w in (-1, g) for w, g in zip(spec, shape, strict=True))


def _rows(named: Mapping[str, np.ndarray]) -> int:
    first = next(iter(named.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _split_rows(
    named: Mapping[str, np.ndarray], rows: int, limit: int
) -> list[dict[str, np.ndarray]]:
    return [
        {name: array[start : start + limit] for name, array in named.items()}
        for start in range(0, rows, limit)
    ]


def _infer_request(
    model: str,
    version: str,
    named: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    priority: int,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in named.items():
        request.inputs.add(name=name, datatype=_datatype(name, array), shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    if priority:
        request.parameters["priority"].int64_param = priority
    return request


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
