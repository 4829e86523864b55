"""The Introspection servicer (moduleserve.v1): thin adapters over registry.inspection.

A version that is loaded is inspected through its live module (no second copy of the
weights). Any other version is built from the registry on the CPU in a worker thread,
used for the one call and dropped: it never enters the serving cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc
from torch import nn

from moduleserve.client.inspect_render import format_tree
from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.client.pb import moduleserve_v1_pb2_grpc as pb_grpc
from moduleserve.registry import inspection, introspect
from moduleserve.registry.api import Registry
from moduleserve.registry.entities import Version
from moduleserve.registry.errors import (
    ClassBuildError,
    ClassNotAllowedError,
    InvalidInputError,
    StateDictMismatchError,
)
from moduleserve.server.convert_introspect import (
    diff_to_pb,
    kind_filter_from_pb,
    ref_from_pb,
    tensor_to_pb,
    tensors_to_pb,
    tree_to_pb,
)
from moduleserve.server.engine.cache import ModelCache
from moduleserve.server.engine.load_errors import load_error
from moduleserve.server.status import map_errors

Context = grpc.aio.ServicerContext
T = TypeVar("T")

# Unloaded versions built at once for ListTensors/GetTensor: each holds a full copy of the
# weights for the length of the call, so concurrent callers must not multiply that freely.
MAX_CONCURRENT_BUILDS = 2
# Room for the response's other fields under the message limit.
_MESSAGE_SLACK_BYTES = 1 << 20
# complex128, the widest element a tensor can have.
_WIDEST_ELEMENT_BYTES = 16


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
        nodes, totals = await _built(version, inspection.tree, self.registry, version, live)
        text = format_tree(nodes)
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
            summaries, totals = await _built(
                version, inspection.summaries, self.registry, version, kind, pattern, live
            )
        return tensors_to_pb(version, live is not None, summaries, totals)

    @map_errors
    async def GetTensor(
        self, request: pb.GetTensorRequest, context: Context
    ) -> pb.GetTensorResponse:
        if not request.name:
            raise InvalidInputError("the request names no tensor")
        cap = inspection.element_cap(request.max_elements, self.max_elements_ceiling)
        version, live = await self._resolve(request.model)
        async with self._builds:
            values = await _built(
                version,
                inspection.values,
                self.registry,
                version,
                request.name,
                request.slices,
                cap,
                live,
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
        other_model, other_text = ref_from_pb(other_ref, "other")
        # Resolved first so that a class that no longer builds is told as a failed load.
        version = await asyncio.to_thread(self.registry.checkpoints.resolve, base_model, base_ref)
        async with self._builds:
            base, other, diff = await _built(
                version,
                inspection.diff,
                self.registry,
                (base_model, base_ref),
                (other_model, other_text),
            )
        return diff_to_pb(base, other, diff)

    async def _resolve(self, ref: pb.ModelRef) -> tuple[Version, nn.Module | None]:
        """The version a ref names, and its live module when that version is loaded now."""
        model, ref_text = ref_from_pb(ref)
        version = await asyncio.to_thread(self.registry.checkpoints.resolve, model, ref_text)
        # By number: an alias or "" may resolve to a loaded version never requested that way.
        loaded = self.cache.peek(version.model, str(version.version))
        return version, loaded.module if loaded is not None else None


async def _built(version: Version, inspect: Callable[..., T], *args: object) -> T:
    """Run an inspection that builds `version` in a worker thread; a class that no longer
    builds is told as a failed load is, without the text of the user's code."""
    try:
        return await asyncio.to_thread(inspect, *args)
    except (ClassBuildError, ClassNotAllowedError, StateDictMismatchError) as exc:
        error = load_error(version, exc)
    raise error  # outside the except block, as in server.engine.cache
