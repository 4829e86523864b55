"""The Open Inference Protocol's operations over plain entities and tensors: no wire in here.

Every front end is a codec over one `DataPlane` (MLServer's shape): the gRPC servicer
(`servicers/oip.py`, served by grpc.aio or by the ASGI gRPC codec) and the KServe V2
REST routes (`frontends/rest.py`) decode a request, call one method here, and encode
what it returns. Errors are the domain errors of `registry/errors.py` and
`server/errors.py`; each codec maps them to its own status (gRPC code or HTTP status).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.entities import Model, ModuleClass, Version
from moduleserve.registry.errors import InvalidInputError, NotFoundError
from moduleserve.registry.names import parse_ref
from moduleserve.server.config import BatchingSettings
from moduleserve.server.engine.batcher import BatcherStats
from moduleserve.server.engine.cache import LoadedModel, ModelCache
from moduleserve.server.inference import infer

EXTENSIONS = [
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "model_configuration",
    "schedule_policy",
    "binary_tensor_data",
]


def server_version() -> str:
    """The installed moduleserve version."""
    try:
        return package_version("moduleserve")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True)
class ModelMetadata:
    model: Model
    module_class: ModuleClass


@dataclass(frozen=True)
class ModelConfig:
    version: Version
    module_class: ModuleClass
    batching: BatchingSettings
    loaded: LoadedModel | None  # where its forward passes run, when loaded


@dataclass(frozen=True)
class InferResult:
    """One answered request: the version that ran it and its outputs, in request order."""

    model: str
    version: int
    outputs: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelStats:
    model: str
    version: int
    stats: BatcherStats


@dataclass(frozen=True)
class IndexEntry:
    """One model version in the repository index (Triton's states: READY, LOADING, UNAVAILABLE)."""

    model: str
    version: int
    state: str
    reason: str


class DataPlane:
    """Inference, readiness, metadata, statistics and the repository over the model cache."""

    def __init__(self, cache: ModelCache, registry: Registry) -> None:
        self.cache = cache
        self.registry = registry
        self.ready = False
        """True once the server has started (and loaded what it loads at start)."""

    async def model_ready(self, model: str, ref: str = "") -> bool:
        """Loaded and warmed up, the ref resolved as inference resolves it (an alias, a
        number, or "" for the default alias else the latest); never loads anything. An
        unknown model, version or alias is simply not ready (as Triton)."""
        if not model:
            return False
        try:
            return await self.cache.find(model, ref) is not None
        except NotFoundError:
            return False

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("moduleserve", server_version(), list(EXTENSIONS))

    async def model_metadata(self, model: str, ref: str = "") -> ModelMetadata:
        require_name(model)
        _, module_class, _ = await self._version_and_class(model, ref)
        found = await asyncio.to_thread(self.registry.checkpoints.get_model, model)
        return ModelMetadata(found, module_class)

    async def model_config(self, model: str, ref: str = "") -> ModelConfig:
        require_name(model)
        version, module_class, loaded = await self._version_and_class(model, ref)
        return ModelConfig(version, module_class, self.cache.settings.batching_for(model), loaded)

    async def _version_and_class(
        self, model: str, ref: str
    ) -> tuple[Version, ModuleClass, LoadedModel | None]:
        """The version a ref names (resolved as inference resolves it), its class, and the
        loaded model when that version is in memory (whose class needs no lookup)."""
        version = await self.cache.resolve(model, ref)
        loaded = self.cache.peek(version.model, str(version.version))
        if loaded is not None:
            return version, loaded.module_class, loaded
        return version, await asyncio.to_thread(self.registry.module_class_of, version), None

    async def infer(
        self,
        model: str,
        ref: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        requested: Sequence[str] = (),
        deadline: float | None = None,
        priority: int = 0,
    ) -> InferResult:
        """Run one request through the model's dynamic batcher."""
        require_name(model)
        loaded, outputs = await infer(
            self.cache,
            model,
            ref,
            inputs,
            requested=requested,
            deadline=deadline,
            priority=priority,
        )
        return InferResult(model, loaded.version.version, outputs)

    async def statistics(self, model: str = "", ref: str = "") -> list[ModelStats]:
        """Counters of loaded versions: of every model when `model` is empty, of every
        version when `ref` is (Triton's statistics extension), else of the version `ref`
        names, resolved as inference resolves it (an alias, or a number). A named model,
        version or alias that does not exist is NOT_FOUND; one not in memory has none."""
        if not ref:
            loaded = [m for m in self.cache.loaded() if not model or m.name == model]
            if model and not loaded:  # an unknown model is NOT_FOUND, a known one has no stats
                await asyncio.to_thread(self.registry.checkpoints.get_model, model)
            return [ModelStats(m.name, m.version.version, m.batcher.stats()) for m in loaded]
        parse_ref(ref)  # refuse a malformed version before any lookup
        found: list[ModelStats] = []
        for name in [model] if model else sorted({m.name for m in self.cache.loaded()}):
            try:
                version = await self.cache.resolve(name, ref)
            except NotFoundError:
                if model:
                    raise
                continue  # across all models: those without that version or alias have none
            one = self.cache.peek(version.model, str(version.version))
            if one is not None:
                found.append(ModelStats(one.name, one.version.version, one.batcher.stats()))
        return found

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version of every registered model, with its state in this server."""
        models = await asyncio.to_thread(self.registry.checkpoints.list_models)
        entries = []
        for model in models:
            for number in model.versions:
                state, reason = self._state(model.name, number)
                if not ready_only or state == "READY":
                    entries.append(IndexEntry(model.name, number, state, reason))
        return entries

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

    async def load(self, model: str, ref: str = "") -> None:
        """Load (and warm up) a version."""
        require_name(model)
        await self.cache.load(model, ref)

    async def unload(self, model: str) -> None:
        """Unload every loaded version of `model` (unknown model: NOT_FOUND)."""
        require_name(model)
        if not await self.cache.unload(model):
            await asyncio.to_thread(self.registry.checkpoints.get_model, model)


def require_name(name: str) -> None:
    if not name:
        raise InvalidInputError("the request names no model")
