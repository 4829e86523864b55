"""The Introspection servicer (moduleserve.v1): thin adapters over server.introspect.

A version that is loaded is inspected through its live module (no second copy of the
weights). Any other version is built from the registry on the CPU in a worker thread,
used for the one call and dropped: it never enters the serving cache. The module tree
of an unloaded version needs no weights at all, so it is built on the meta device.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
import torch
from torch import nn

from client.pb import moduleserve_v1_pb2 as pb
from client.pb import moduleserve_v1_pb2_grpc as pb_grpc
from registry.api import Registry
from registry.entities import Version
from registry.errors import InvalidInputError
from server import introspect
from server.convert_introspect import (
    diff_to_pb,
    kind_filter_from_pb,
    ref_from_pb,
    tensor_to_pb,
    tensors_to_pb,
    tree_to_pb,
)
from server.engine.cache import ModelCache
from server.status import map_errors

Context = grpc.aio.ServicerContext

# Unloaded versions built at once for ListTensors/GetTensor: each holds a full copy of the
# weights for the length of the call, so concurrent callers must not multiply that freely.
MAX_CONCURRENT_BUILDS = 2
# Room for the response's other fields under the message limit.
_MESSAGE_SLACK_BYTES = 1 << 20
# complex128, the widest element a tensor can have.
_WIDEST_ELEMENT_BYTES = 16


class IncompatibleClassesError(InvalidInputError):
    """Two versions to diff belong to different Module classes (different import paths)."""

    def __init__(self, base: Version, base_path: str, other: Version, other_path: str) -> None:
        super().__init__(
            f"cannot diff {other.model}:{other.version} ({other_path}) against "
            f"{base.model}:{base.version} ({base_path}): they are different Module classes"
        )
        self.base, self.other = base, other


class IntrospectionServicer(pb_grpc.IntrospectionServicer):
    """Module tree, tensor statistics, values and version diffs of registered models."""

    def __init__(self, registry: Registry, cache: ModelCache) -> None:
        self.registry = registry
        self.cache = cache
        limit = min(cache.settings.max_message_mb * 2**20, 2**31 - 1)
        room = max(limit - _MESSAGE_SLACK_BYTES, limit // 2)
        self.max_elements_ceiling = room // _WIDEST_ELEMENT_BYTES
        self._builds = asyncio.Semaphore(MAX_CONCURRENT_BUILDS)

    @map_errors
    async def GetModuleTree(
        self, request: pb.GetModuleTreeRequest, context: Context
    ) -> pb.GetModuleTreeResponse:
        version, live = await self._resolve(request.model)
        nodes, totals = await asyncio.to_thread(_tree, self.registry, version, live)
        text = introspect.format_tree(nodes)
        return tree_to_pb(version, live is not None, nodes, totals, text)

    @map_errors
    async def ListTensors(
        self, request: pb.ListTensorsRequest, context: Context
    ) -> pb.ListTensorsResponse:
        kind = kind_filter_from_pb(request.kind)
        pattern = request.pattern if request.HasField("pattern") else None
        if pattern is not None:
            introspect.check_pattern(pattern)  # refuse before any weights are read
        version, live = await self._resolve(request.model)
        async with self._builds:
            summaries, totals = await asyncio.to_thread(
                _summaries, self.registry, version, live, kind, pattern
            )
        return tensors_to_pb(version, live is not None, summaries, totals)

    @map_errors
    async def GetTensor(
        self, request: pb.GetTensorRequest, context: Context
    ) -> pb.GetTensorResponse:
        if not request.name:
            raise InvalidInputError("the request names no tensor")
        if request.max_elements < 0:
            raise InvalidInputError(f"max_elements must be 0 or more, not {request.max_elements}")
        cap = request.max_elements or introspect.DEFAULT_MAX_ELEMENTS
        cap = min(cap, self.max_elements_ceiling)
        version, live = await self._resolve(request.model)
        async with self._builds:
            values = await asyncio.to_thread(
                _values, self.registry, version, live, request.name, request.slices, cap
            )
        return tensor_to_pb(version, live is not None, request.name, values)

    @map_errors
    async def DiffVersions(
        self, request: pb.DiffVersionsRequest, context: Context
    ) -> pb.DiffVersionsResponse:
        base_model, base_ref = ref_from_pb(request.base, "base")
        other_ref = pb.ModelRef(
            model=request.other.model or base_model, version=request.other.version
        )
        other_model, other_ref_text = ref_from_pb(other_ref, "other")
        async with self._builds:
            base, other, diff, kinds = await asyncio.to_thread(
                _diff, self.registry, (base_model, base_ref), (other_model, other_ref_text)
            )
        return diff_to_pb(base, other, diff, kinds)

    async def _resolve(self, ref: pb.ModelRef) -> tuple[Version, nn.Module | None]:
        """The version a ref names, and its live module when that version is loaded now."""
        model, ref_text = ref_from_pb(ref)
        version = await asyncio.to_thread(self.registry.checkpoints.resolve, model, ref_text)
        # By number: an alias or "" may resolve to a loaded version never requested that way.
        loaded = self.cache.peek(version.model, str(version.version))
        return version, loaded.module if loaded is not None else None


def _tree(
    registry: Registry, version: Version, live: nn.Module | None
) -> tuple[list[introspect.ModuleNode], introspect.Totals]:
    """Module tree and totals; structure alone, so an unloaded version is built on meta."""
    if live is None:
        live = registry.classes.build(registry.module_class_of(version), device="meta")
    return introspect.module_tree(live), introspect.totals(live)


def _summaries(
    registry: Registry,
    version: Version,
    live: nn.Module | None,
    kind: introspect.Kind,
    pattern: str | None,
) -> tuple[list[introspect.TensorSummary], introspect.Totals]:
    """Tensor summaries of the live module, or of the version built on the CPU for this call."""
    module = live if live is not None else registry.build_version(version, "cpu")
    return introspect.tensor_summaries(module, kind, pattern), introspect.totals(module)


def _values(
    registry: Registry,
    version: Version,
    live: nn.Module | None,
    name: str,
    slices: str,
    cap: int,
) -> torch.Tensor:
    """One tensor's (sliced) values as a CPU copy."""
    module = live if live is not None else registry.build_version(version, "cpu")
    return introspect.tensor_values(module, name, slices, cap)


def _diff(
    registry: Registry, base_ref: tuple[str, str], other_ref: tuple[str, str]
) -> tuple[Version, Version, introspect.StateDiff, dict[str, introspect.TensorKind]]:
    """Diff two stored checkpoints of one Module class; kinds come from a meta build."""
    base = registry.checkpoints.resolve(*base_ref)
    other = registry.checkpoints.resolve(*other_ref)
    base_class, other_class = registry.module_class_of(base), registry.module_class_of(other)
    if base_class.import_path != other_class.import_path:
        raise IncompatibleClassesError(base, base_class.import_path, other, other_class.import_path)
    kinds = introspect.tensor_kinds(registry.classes.build(base_class, device="meta"))
    # Stored checkpoints come back sorted by key; report in the module's own order instead.
    base_tensors = _in_order(registry.state_dict(base), kinds)
    other_tensors = _in_order(registry.state_dict(other), kinds)
    diff = introspect.diff_state_dicts(base_tensors, other_tensors)
    return base, other, diff, kinds


def _in_order(tensors: dict[str, torch.Tensor], order: Iterable[str]) -> dict[str, torch.Tensor]:
    """`tensors` with the names in `order` first, in that order, then any others."""
    ordered = {name: tensors[name] for name in order if name in tensors}
    ordered.update((name, tensor) for name, tensor in tensors.items() if name not in ordered)
    return ordered
