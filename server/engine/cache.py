"""The loaded-model cache: lazy and explicit loads, warm-up, LRU memory budget, alias moves."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from registry.api import Registry
from registry.entities import ModuleClass, Version
from registry.formats import parse_dtype
from server.config import BatchingSettings, ServerSettings
from server.engine.batcher import DynamicBatcher
from server.engine.devices import HALF_TYPES, DeviceExecutors, make_compute, module_nbytes
from server.errors import ModelLoadingError

logger = logging.getLogger(__name__)

StatusCallback = Callable[[str, bool], Awaitable[None]]
Key = tuple[str, int]


@dataclass(eq=False)
class LoadedModel:
    """One (model, version) in memory, warmed up, with its batcher running."""

    name: str
    version: Version
    module_class: ModuleClass
    module: nn.Module
    batcher: DynamicBatcher
    batching: BatchingSettings
    device: torch.device
    nbytes: int
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)


class ModelCache:
    """Loaded models keyed by (model, version); refs (alias, number, "") map onto them."""

    def __init__(
        self,
        registry: Registry,
        settings: ServerSettings,
        executors: DeviceExecutors,
        device: torch.device,
        on_status: StatusCallback | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.device = device
        self._executors = executors
        self._on_status = on_status
        self._budget = int(settings.memory_budget_mb * 1024 * 1024)
        self._models: dict[Key, LoadedModel] = {}
        self._refs: dict[tuple[str, str], int] = {}
        self._loading: dict[Key, asyncio.Task[LoadedModel]] = {}
        self._budget_lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None

    # -- lookups ---------------------------------------------------------------------------

    async def get(self, model: str, ref: str = "") -> LoadedModel:
        """The loaded model for a version ref, loading it on first use."""
        number = self._refs.get((model, ref))
        if number is not None:
            loaded = self._models.get((model, number))
            if loaded is not None:
                loaded.last_used = time.monotonic()
                return loaded
        version = await asyncio.to_thread(self.registry.checkpoints.resolve, model, ref)
        loaded = await self._ensure_loaded(version)
        self._refs[(model, ref)] = version.version
        return loaded

    def peek(self, model: str, ref: str = "") -> LoadedModel | None:
        """The loaded model for a ref if it is in memory now; never loads."""
        number = self._refs.get((model, ref))
        if number is None and ref.isdigit():
            number = int(ref)
        return self._models.get((model, number)) if number is not None else None

    def loaded(self) -> list[LoadedModel]:
        """Every model in memory."""
        return list(self._models.values())

    def is_loading(self, model: str, version: int) -> bool:
        """Whether that version is being loaded now."""
        return (model, version) in self._loading

    # -- loading and unloading -------------------------------------------------------------

    async def load(self, model: str, ref: str = "") -> LoadedModel:
        """Explicit load (RepositoryModelLoad); the same as the lazy path."""
        return await self.get(model, ref)

    async def _ensure_loaded(self, version: Version) -> LoadedModel:
        key = (version.model, version.version)
        if key in self._models:
            return self._models[key]
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(version))
            self._loading[key] = task
            task.add_done_callback(lambda _t, k=key: self._loading.pop(k, None))
        # shield: a caller that goes away must not cancel a load others wait for.
        return await asyncio.shield(task)

    async def _load(self, version: Version) -> LoadedModel:
        name = version.model
        await self._make_room(version)
        started = time.perf_counter()
        try:
            module_class = await asyncio.to_thread(self.registry.module_class_of, version)
            module = await asyncio.to_thread(self._build, version)
        except Exception as exc:
            if not isinstance(exc, LookupError | ValueError | RuntimeError | OSError):
                raise
            raise ModelLoadingError(name, str(version.version), f"failed to load: {exc}") from exc
        batching = self.settings.batching_for(name)
        half = HALF_TYPES.get(self.settings.dtype)
        compute = make_compute(
            module,
            [s.name for s in module_class.inputs],
            [s.name for s in module_class.outputs],
            self.device,
            half,
        )
        executor = self._executors.for_device(self.device)
        await self._warm_up(name, version, module_class, compute, executor)
        batcher = DynamicBatcher(
            f"{name}:{version.version}",
            compute,
            executor,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000,
            preferred_batch_sizes=batching.preferred_batch_sizes,
            max_queue_size=batching.max_queue_size,
        )
        batcher.start()
        loaded = LoadedModel(
            name,
            version,
            module_class,
            module,
            batcher,
            batching,
            self.device,
            module_nbytes(module),
        )
        self._models[(name, version.version)] = loaded
        logger.info(
            "loaded %s:%d on %s (%.1f MiB) in %.2fs",
            name,
            version.version,
            self.device,
            loaded.nbytes / 2**20,
            time.perf_counter() - started,
        )
        await self._notify(name)
        return loaded

    def _build(self, version: Version) -> nn.Module:
        module = self.registry.build_version(version, self.device)
        half = HALF_TYPES.get(self.settings.dtype)
        return module.to(half) if half is not None else module

    async def _warm_up(
        self,
        name: str,
        version: Version,
        module_class: ModuleClass,
        compute: Callable[..., object],
        executor: object,
    ) -> None:
        """One forward on zeros, so the first real request pays no one-time costs."""
        inputs = {
            spec.name: torch.zeros(
                [1 if d == -1 else d for d in spec.shape], dtype=parse_dtype(spec.dtype)
            )
            for spec in module_class.inputs
        }
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, compute, inputs)  # type: ignore[arg-type]
        except Exception as exc:  # user code failed on its own declared input spec
            raise ModelLoadingError(
                name, str(version.version), f"failed its warm-up forward pass: {exc}"
            ) from exc

    async def _make_room(self, version: Version) -> None:
        """Evict least recently used models until the new checkpoint fits the budget."""
        need = version.size
        if need > self._budget:
            raise ModelLoadingError(
                version.model,
                str(version.version),
                f"needs {need / 2**20:.1f} MiB, more than the memory budget of "
                f"{self._budget / 2**20:.0f} MiB",
            )
        async with self._budget_lock:
            while sum(m.nbytes for m in self._models.values()) + need > self._budget:
                victim = min(self._models.values(), key=lambda m: m.last_used)
                logger.info(
                    "evicting %s:%d to stay within the memory budget",
                    victim.name,
                    victim.version.version,
                )
                await self._drop(victim)

    async def unload(self, model: str) -> int:
        """Unload every version of a model; in-flight requests finish first. Returns count."""
        victims = [m for m in self._models.values() if m.name == model]
        for victim in victims:
            await self._drop(victim)
        for key in [k for k in self._refs if k[0] == model]:
            del self._refs[key]
        return len(victims)

    async def _drop(self, loaded: LoadedModel) -> None:
        self._models.pop((loaded.name, loaded.version.version), None)
        await loaded.batcher.stop(drain=True)
        device = loaded.device
        del loaded
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        await self._notify_all_names()

    async def _notify(self, name: str) -> None:
        if self._on_status is not None:
            await self._on_status(name, any(m.name == name for m in self._models.values()))

    async def _notify_all_names(self) -> None:
        if self._on_status is None:
            return
        for name in {key[0] for key in self._refs} | {m.name for m in self._models.values()}:
            await self._notify(name)

    # -- alias moves -----------------------------------------------------------------------

    def start(self) -> None:
        """Start re-reading aliases of loaded models in the background."""
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alias_refresh_s)
            try:
                await self.refresh_aliases()
            except Exception:  # a registry hiccup must not stop future refreshes
                logger.exception("alias refresh failed")

    async def refresh_aliases(self) -> None:
        """Re-resolve alias and default refs; load a moved target, then swap it in.

        Requests keep going to the old version until the new one is warm, and the
        old one is unloaded only after its in-flight requests finish (drain).
        """
        for (model, ref), number in list(self._refs.items()):
            if ref.isdigit():
                continue
            try:
                version = await asyncio.to_thread(self.registry.checkpoints.resolve, model, ref)
            except LookupError as exc:
                logger.warning(
                    "keeping %s:%s at version %d: %s", model, ref or "default", number, exc
                )
                continue
            if version.version == number:
                continue
            await self._ensure_loaded(version)
            self._refs[(model, ref)] = version.version
            logger.info(
                "%s:%s moved from version %d to %d",
                model,
                ref or "default",
                number,
                version.version,
            )
            if (model, number) not in {(m, n) for (m, _), n in self._refs.items()}:
                old = self._models.get((model, number))
                if old is not None:
                    await self._drop(old)

    async def close(self) -> None:
        """Stop refreshing and unload everything (in-flight requests finish)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for loaded in list(self._models.values()):
            await self._drop(loaded)
