"""`IntrospectionClient`: module tree, tensor statistics, values and version diffs of a model.

    from moduleserve.client.client import ModelClient
    from moduleserve.client.introspection import IntrospectionClient

    with ModelClient("127.0.0.1:8001") as client:
        inspect = IntrospectionClient(client.channel)
        print(inspect.tree("net").text)
        listing = inspect.tensors("net", kind="buffers", pattern="block1.*")
        weight = inspect.tensor("net", "head.weight", slices="0:2, :")   # numpy array
        diff = inspect.diff("mlp", "1", "2")                              # version 2 vs 1

Results are the frozen dataclasses of `introspection_results`, with `to_dict()` for JSON.
torch is imported only when a tensor is asked for `as_torch=True`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import EllipsisType
from typing import Any

import grpc
import numpy as np

from moduleserve.client.client import translate_errors
from moduleserve.client.introspection_results import (
    DiffMetrics,
    KindFilter,
    ModelVersion,
    ModuleNode,
    ModuleTree,
    TensorDiff,
    TensorKind,
    TensorListing,
    TensorStats,
    TensorSummary,
    Totals,
    VersionDiff,
)
from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.client.pb import moduleserve_v1_pb2_grpc as pb_grpc

Index = int | slice | EllipsisType
Metadata = Sequence[tuple[str, str]]

KIND_NAMES: dict[int, TensorKind] = {
    pb.TENSOR_KIND_UNSPECIFIED: "",
    pb.TENSOR_KIND_PARAMETER: "parameter",
    pb.TENSOR_KIND_BUFFER: "buffer",
}
KIND_FILTERS: dict[str, pb.TensorKind] = {
    "all": pb.TENSOR_KIND_UNSPECIFIED,
    "parameters": pb.TENSOR_KIND_PARAMETER,
    "buffers": pb.TENSOR_KIND_BUFFER,
}
# Little-endian, as the server sends them. bfloat16 has no numpy type (see `decode_tensor`).
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "?",
        "uint8": "u1",
        "int8": "i1",
        "int16": "<i2",
        "uint16": "<u2",
        "int32": "<i4",
        "uint32": "<u4",
        "int64": "<i8",
        "uint64": "<u8",
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
        "complex64": "<c8",
        "complex128": "<c16",
    }.items()
}


class UnsupportedDtypeError(ValueError):
    """Tensor values whose dtype this client cannot decode (to numpy, or with torch)."""


class IntrospectionClient:
    """Synchronous calls to the `moduleserve.v1.Introspection` service over a channel."""

    def __init__(
        self, channel: grpc.Channel, *, metadata: Metadata = (), timeout: float | None = 60.0
    ) -> None:
        self._stub = pb_grpc.IntrospectionStub(channel)  # type: ignore[no-untyped-call]  # generated
        self._metadata = tuple(metadata)
        self.timeout = timeout

    def tree(self, model: str, version: str = "") -> ModuleTree:
        """Every submodule with class name, extra_repr and parameter counts."""
        reply = self._call("GetModuleTree", pb.GetModuleTreeRequest(model=_ref(model, version)))
        return ModuleTree(
            model=version_from_pb(reply.model),
            nodes=tuple(module_node_from_pb(n) for n in reply.nodes),
            totals=totals_from_pb(reply.totals),
            text=reply.text,
        )

    def tensors(
        self,
        model: str,
        version: str = "",
        kind: KindFilter = "all",
        pattern: str | None = None,
    ) -> TensorListing:
        """Parameters and/or buffers whose names match the glob, with statistics and totals."""
        if kind not in KIND_FILTERS:
            raise ValueError(f"kind must be 'all', 'parameters' or 'buffers', not {kind!r}")
        request = pb.ListTensorsRequest(model=_ref(model, version), kind=KIND_FILTERS[kind])
        if pattern is not None:
            request.pattern = pattern
        reply = self._call("ListTensors", request)
        return TensorListing(
            model=version_from_pb(reply.model),
            tensors=tuple(summary_from_pb(t) for t in reply.tensors),
            totals=totals_from_pb(reply.totals),
        )

    def tensor(
        self,
        model: str,
        name: str,
        version: str = "",
        slices: str | Sequence[Index] | None = None,
        max_elements: int | None = None,
        as_torch: bool = False,
    ) -> Any:
        """One tensor's values (numpy array, or torch tensor with `as_torch`), optionally sliced.

        `slices` is numpy syntax, as text ("0:2, :") or as a tuple (`(slice(0, 2), 3)`).
        A selection over `max_elements` (server default 262144) raises InvalidArgumentError.
        numpy has no bfloat16: such values come back as float32 (exactly), or use `as_torch`.
        """
        request = pb.GetTensorRequest(
            model=_ref(model, version),
            name=name,
            slices=format_slices(slices),
            max_elements=max_elements or 0,
        )
        reply = self._call("GetTensor", request)
        return decode_tensor(reply.dtype, tuple(reply.shape), reply.data, as_torch=as_torch)

    def diff(
        self, model: str, version: str, other_version: str, other_model: str | None = None
    ) -> VersionDiff:
        """Compare `other_model:other_version` (default: the same model) against `version`."""
        request = pb.DiffVersionsRequest(
            base=_ref(model, version), other=_ref(other_model or model, other_version)
        )
        return diff_from_pb(self._call("DiffVersions", request))

    def _call(self, method: str, request: Any) -> Any:
        with translate_errors():
            return getattr(self._stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )


def _ref(model: str, version: str | int) -> pb.ModelRef:
    return pb.ModelRef(model=model, version=str(version))


def format_slices(slices: str | Sequence[Index] | None) -> str:
    """Index text for GetTensor: "0:2, 3" from `(slice(0, 2), 3)`; text passes through."""
    if slices is None:
        return ""
    if isinstance(slices, str):
        return slices
    parts = []
    for item in slices:
        if item is Ellipsis:
            parts.append("...")
        elif isinstance(item, slice):
            bounds = (item.start, item.stop, item.step)
            text = ":".join("" if b is None else str(int(b)) for b in bounds)
            parts.append(text.removesuffix(":"))
        elif isinstance(item, int | np.integer):
            parts.append(str(int(item)))
        else:
            raise ValueError(f"cannot index with {item!r}: use ints, slices and ...")
    return ", ".join(parts)


def decode_tensor(
    dtype: str, shape: tuple[int, ...], data: bytes, *, as_torch: bool = False
) -> Any:
    """Little-endian element bytes to a numpy array (bfloat16 widened to float32) or torch."""
    if as_torch:
        import torch  # optional dependency of the client

        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise UnsupportedDtypeError(f"dtype {dtype!r} is not a torch dtype this client knows")
        if not data:
            return torch.empty(shape, dtype=torch_dtype)
        return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)
    if dtype == "bfloat16":  # the top half of a float32: widening is exact
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    np_dtype = NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        raise UnsupportedDtypeError(
            f"dtype {dtype!r} has no numpy equivalent; ask for it with as_torch=True"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()


def version_from_pb(message: pb.ModelVersion) -> ModelVersion:
    """ModelVersion from its message."""
    return ModelVersion(message.model, message.version, message.class_name, message.loaded)


def module_node_from_pb(message: pb.ModuleNode) -> ModuleNode:
    """ModuleNode from its message."""
    return ModuleNode(
        message.name,
        message.depth,
        message.class_name,
        message.extra_repr,
        message.parameters,
        message.trainable,
        message.frozen,
        message.own_parameters,
    )


def totals_from_pb(message: pb.Totals) -> Totals:
    """Totals from its message."""
    return Totals(**{f.name: getattr(message, f.name) for f in dataclasses.fields(Totals)})


def stats_from_pb(message: pb.TensorStats) -> TensorStats:
    """TensorStats from its message; unset optional figures become None."""

    def optional(field: str) -> float | None:
        return getattr(message, field) if message.HasField(field) else None

    return TensorStats(
        mean=optional("mean"),
        std=optional("std"),
        min=optional("min"),
        max=optional("max"),
        norm=optional("norm"),
        zero_fraction=message.zero_fraction,
        finite=message.finite,
        nan_count=message.nan_count,
        inf_count=message.inf_count,
    )


def summary_from_pb(message: pb.TensorSummary) -> TensorSummary:
    """TensorSummary from its message."""
    return TensorSummary(
        name=message.name,
        kind=KIND_NAMES.get(message.kind, ""),
        shape=tuple(message.shape),
        dtype=message.dtype,
        device=message.device,
        numel=message.numel,
        requires_grad=message.requires_grad,
        tied_to=tuple(message.tied_to),
        stats=stats_from_pb(message.stats) if message.HasField("stats") else None,
    )


def metrics_from_pb(message: pb.DiffMetrics) -> DiffMetrics:
    """DiffMetrics from its message."""
    relative = message.relative_change if message.HasField("relative_change") else None
    return DiffMetrics(
        changed_elements=message.changed_elements,
        nonfinite_changed=message.nonfinite_changed,
        norm_base=message.norm_base,
        diff_norm=message.diff_norm,
        relative_change=relative,
        max_abs_diff=message.max_abs_diff,
    )


def tensor_diff_from_pb(message: pb.TensorDiff) -> TensorDiff:
    """TensorDiff from its message."""
    return TensorDiff(
        name=message.name,
        kind=KIND_NAMES.get(message.kind, ""),
        shape_base=tuple(message.shape_base),
        shape_other=tuple(message.shape_other),
        dtype_base=message.dtype_base,
        dtype_other=message.dtype_other,
        shape_mismatch=message.shape_mismatch,
        dtype_mismatch=message.dtype_mismatch,
        changed=message.changed,
        metrics=metrics_from_pb(message.metrics) if message.HasField("metrics") else None,
    )


def diff_from_pb(message: pb.DiffVersionsResponse) -> VersionDiff:
    """VersionDiff from the DiffVersions response."""
    return VersionDiff(
        base=version_from_pb(message.base),
        other=version_from_pb(message.other),
        entries=tuple(tensor_diff_from_pb(e) for e in message.entries),
        only_base=tuple(message.only_base),
        only_other=tuple(message.only_other),
        compared=message.compared,
        changed=message.changed,
        unchanged=message.unchanged,
        mismatched=message.mismatched,
    )
