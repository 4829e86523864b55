"""Pure converters from introspection results (``client.introspection_results``, built by
registry.introspect) to moduleserve.v1 messages; the client's converters go the other way."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moduleserve.client.introspection_results import (
    DiffMetrics,
    KindFilter,
    ModuleNode,
    StateDiff,
    TensorDiff,
    TensorKind,
    TensorStats,
    TensorSummary,
    Totals,
)
from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.registry.entities import Version
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.introspect import tensor_bytes

KIND_TO_PB: dict[TensorKind, pb.TensorKind] = {
    "parameter": pb.TENSOR_KIND_PARAMETER,
    "buffer": pb.TENSOR_KIND_BUFFER,
    "": pb.TENSOR_KIND_UNSPECIFIED,
}
FILTER_FROM_PB: dict[int, KindFilter] = {
    pb.TENSOR_KIND_UNSPECIFIED: "all",
    pb.TENSOR_KIND_PARAMETER: "parameters",
    pb.TENSOR_KIND_BUFFER: "buffers",
}


def ref_from_pb(ref: pb.ModelRef, field: str = "model") -> tuple[str, str]:
    """(model, version ref) of a ModelRef; a missing model name is INVALID_ARGUMENT."""
    if not ref.model:
        raise InvalidInputError(f"the request names no model in {field!r}")
    return ref.model, ref.version.strip()


def kind_filter_from_pb(kind: int) -> KindFilter:
    """The tensor_summaries kind for a ListTensorsRequest.kind (an open proto3 enum)."""
    try:
        return FILTER_FROM_PB[kind]
    except KeyError:
        raise InvalidInputError(f"unknown tensor kind {kind}: use 0 (all), 1 or 2") from None


def version_to_pb(version: Version, loaded: bool = False) -> pb.ModelVersion:
    """The version a ref resolved to; `loaded`: figures come from the served module."""
    return pb.ModelVersion(
        model=version.model,
        version=version.version,
        class_name=version.class_name,
        loaded=loaded,
    )


def module_node_to_pb(node: ModuleNode) -> pb.ModuleNode:
    """One module-tree node."""
    return pb.ModuleNode(
        name=node.name,
        depth=node.depth,
        class_name=node.class_name,
        extra_repr=node.extra_repr,
        parameters=node.parameters,
        trainable=node.trainable,
        frozen=node.frozen,
        own_parameters=node.own_parameters,
    )


def totals_to_pb(totals: Totals) -> pb.Totals:
    """Whole-module totals."""
    return pb.Totals(**totals.to_dict())


def tree_to_pb(
    version: Version, loaded: bool, nodes: Iterable[ModuleNode], totals: Totals, text: str
) -> pb.GetModuleTreeResponse:
    """The GetModuleTree response."""
    return pb.GetModuleTreeResponse(
        model=version_to_pb(version, loaded),
        nodes=[module_node_to_pb(node) for node in nodes],
        totals=totals_to_pb(totals),
        text=text,
    )


def stats_to_pb(stats: TensorStats) -> pb.TensorStats:
    """Statistics; None figures stay unset (optional fields)."""
    fields = {key: value for key, value in stats.to_dict().items() if value is not None}
    return pb.TensorStats(**fields)


def summary_to_pb(summary: TensorSummary) -> pb.TensorSummary:
    """One parameter or buffer; `stats` is left unset when there are none."""
    message = pb.TensorSummary(
        name=summary.name,
        kind=KIND_TO_PB[summary.kind],
        shape=summary.shape,
        dtype=summary.dtype,
        device=summary.device,
        numel=summary.numel,
        requires_grad=summary.requires_grad,
        tied_to=summary.tied_to,
    )
    if summary.stats is not None:
        message.stats.CopyFrom(stats_to_pb(summary.stats))
    return message


def tensors_to_pb(
    version: Version, loaded: bool, summaries: Iterable[TensorSummary], totals: Totals
) -> pb.ListTensorsResponse:
    """The ListTensors response."""
    return pb.ListTensorsResponse(
        model=version_to_pb(version, loaded),
        tensors=[summary_to_pb(s) for s in summaries],
        totals=totals_to_pb(totals),
    )


def tensor_to_pb(
    version: Version, loaded: bool, name: str, tensor: torch.Tensor
) -> pb.GetTensorResponse:
    """One tensor's values as row-major little-endian bytes with dtype and shape."""
    return pb.GetTensorResponse(
        model=version_to_pb(version, loaded),
        name=name,
        dtype=str(tensor.dtype).removeprefix("torch."),
        shape=tuple(tensor.shape),
        data=tensor_bytes(tensor),
    )


def metrics_to_pb(metrics: DiffMetrics) -> pb.DiffMetrics:
    """How one tensor changed."""
    message = pb.DiffMetrics(
        changed_elements=metrics.changed_elements,
        nonfinite_changed=metrics.nonfinite_changed,
        norm_base=metrics.norm_base,
        diff_norm=metrics.diff_norm,
        max_abs_diff=metrics.max_abs_diff,
    )
    if metrics.relative_change is not None:
        message.relative_change = metrics.relative_change
    return message


def tensor_diff_to_pb(entry: TensorDiff) -> pb.TensorDiff:
    """One key present in both versions."""
    message = pb.TensorDiff(
        name=entry.name,
        kind=KIND_TO_PB[entry.kind],
        shape_base=entry.shape_base,
        shape_other=entry.shape_other,
        dtype_base=entry.dtype_base,
        dtype_other=entry.dtype_other,
        shape_mismatch=entry.shape_mismatch,
        dtype_mismatch=entry.dtype_mismatch,
        changed=entry.changed,
    )
    if entry.metrics is not None:
        message.metrics.CopyFrom(metrics_to_pb(entry.metrics))
    return message


def diff_to_pb(base: Version, other: Version, diff: StateDiff) -> pb.DiffVersionsResponse:
    """The DiffVersions response."""
    return pb.DiffVersionsResponse(
        base=version_to_pb(base),
        other=version_to_pb(other),
        entries=[tensor_diff_to_pb(e) for e in diff.entries],
        only_base=diff.only_base,
        only_other=diff.only_other,
        compared=diff.compared,
        changed=diff.changed,
        unchanged=diff.unchanged,
        mismatched=diff.mismatched,
    )
