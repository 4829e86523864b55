"""The loaded-model cache: lazy and explicit loads, warm-up, LRU memory budget, alias moves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from torch import nn

from moduleserve.registry.api import Registry
from moduleserve.registry.entities import ModuleClass, Version
from moduleserve.registry.errors import IntegrityError, RegistryError, RegistryUnavailableError
from moduleserve.registry.formats import parse_dtype
from moduleserve.registry.names import parse_ref
from moduleserve.server.config import BatchingSettings, ServerSettings
from moduleserve.server.engine.batcher import DynamicBatcher, StatsLedger
from moduleserve.server.engine.devices import (
    HALF_TYPES,
    ComputeMode,
    DeviceExecutors,
    choose_compute,
    forward_once,
    make_compute,
    module_nbytes,
    time_forward,
)
from moduleserve.server.engine.load_errors import SEE_LOG, LoadFailure, load_error
from moduleserve.server.engine.plan import InputPlan
from moduleserve.server.errors import (
    MemoryBudgetFullError,
    ModelLoadingError,
    ModelNotReadyError,
    ModelOutputError,
    ServerError,
)

logger = logging.getLogger(__name__)

StatusCallback = Callable[[str, bool], Awaitable[None]]
# A version that failed to load is not retried (nor does it evict others) for this long.
LOAD_RETRY_S = 10.0
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
    plan: InputPlan  # the specs, parsed once: what each request is checked against
    compute: ComputeMode = "thread"  # where its forward passes run
    forward_ms: float | None = None  # measured at load at max_batch_size rows (compute=auto)
    # Loaded explicitly (--load, --load-all, RepositoryModelLoad): no load evicts it, only an
    # unload removes it. Lazily loaded models are the ones evicted to make room.
    pinned: bool = False
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
        self._reserved = 0  # bytes promised to loads in progress
        self._failed: dict[Key, LoadFailure] = {}
        self._refresher: asyncio.Task[None] | None = None
        # Per ref (("", "") for the refresh as a whole): the trouble its alias refresh last
        # logged, so that a lasting condition is logged once, not every refresh.
        self._troubles: dict[tuple[str, str], Hashable] = {}
        # Per-version counters for /metrics, kept across unloads and alias swaps.
        self.ledger: StatsLedger[Key] = StatsLedger()

    # -- lookups ---------------------------------------------------------------------------
    #
    # Every caller resolves a version ref the same way (inference, readiness, metadata,
    # config, statistics): a ref requests already use keeps the version they run on until
    # the alias refresher swaps in its new target, warm by then; any other ref is resolved
    # by the registry (a few indexed queries), and a number needs no lookup to be found in
    # memory. Readiness never loads anything, and never adds a ref for the refresher to
    # follow (that would load the alias's next target for a probe).

    async def get(self, model: str, ref: str = "") -> LoadedModel:
        """The loaded model for a version ref, loading it on first use if lazy loading is on."""
        return await self._get(model, ref, explicit=False)

    async def _get(self, model: str, ref: str, explicit: bool) -> LoadedModel:
        loaded = self._in_use(model, ref)
        if loaded is None:
            version = await asyncio.to_thread(self.registry.checkpoints.resolve, model, ref)
            key = (version.model, version.version)
            if not (
                explicit or self.settings.lazy_load or key in self._models or key in self._loading
            ):
                raise ModelNotReadyError(
                    model,
                    str(version.version),
                    "is not loaded, and this server loads models only when an operator asks "
                    f"(RepositoryModelLoad: moduleserve load {model})",
                )
            loaded = await self._ensure_loaded(version)
            self._refs[(model, ref)] = version.version
        loaded.last_used = time.monotonic()
        if explicit:
            loaded.pinned = True
        return loaded

    def _in_use(self, model: str, ref: str) -> LoadedModel | None:
        """The loaded model a ref in use points at: the version its requests run on."""
        number = self._refs.get((model, ref))
        return None if number is None else self._models.get((model, number))

    async def resolve(self, model: str, ref: str = "") -> Version:
        """The version a ref names on this server now, as inference resolves it; never
        loads. Unknown models, versions and aliases raise the registry's NotFoundError."""
        loaded = self._in_use(model, ref)
        if loaded is not None:
            return loaded.version
        return await asyncio.to_thread(self.registry.checkpoints.resolve, model, ref)

    async def find(self, model: str, ref: str = "") -> LoadedModel | None:
        """The loaded model a ref names now (resolved as `resolve` does), or None when that
        version is not in memory; never loads. A malformed ref raises InvalidInputError."""
        loaded = self._in_use(model, ref)
        if loaded is not None:
            return loaded
        parsed = parse_ref(ref)
        if isinstance(parsed, int):  # a number is its own version: no registry lookup
            return self._models.get((model, parsed))
        version = await self.resolve(model, ref)
        return self._models.get((version.model, version.version))

    def peek(self, model: str, ref: str = "") -> LoadedModel | None:
        """The loaded model for a version number (or a ref in use) if it is in memory now;
        never loads, never waits. For a ref of any kind, `find`. A malformed ref raises
        InvalidInputError."""
        number = self._refs.get((model, ref))
        if number is None:
            parsed = parse_ref(ref)
            number = parsed if isinstance(parsed, int) else None
        return self._models.get((model, number)) if number is not None else None

    def loaded(self) -> list[LoadedModel]:
        """Every model in memory."""
        return list(self._models.values())

    def is_loading(self, model: str, version: int) -> bool:
        """Whether that version is being loaded now."""
        return (model, version) in self._loading

    def failure(self, model: str, version: int) -> str | None:
        """Why that version's last load failed (until one succeeds), or None."""
        failure = self._failed.get((model, version))
        return failure.reason if failure is not None else None

    # -- loading and unloading -------------------------------------------------------------

    async def load(self, model: str, ref: str = "") -> LoadedModel:
        """Explicit load (RepositoryModelLoad, --load, --load-all): loads whatever `lazy_load`
        says, and pins the version (no load evicts it; only an unload removes it)."""
        return await self._get(model, ref, explicit=True)

    async def _ensure_loaded(self, version: Version, why: str = "") -> LoadedModel:
        key = (version.model, version.version)
        if key in self._models:
            return self._models[key]
        failure = self._failed.get(key)
        if failure is not None and time.monotonic() < failure.retry_at:
            raise failure.error(key)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(version, why))
            self._loading[key] = task
            task.add_done_callback(lambda _t, k=key: self._loading.pop(k, None))
        # shield: a caller that goes away must not cancel a load others wait for.
        return await asyncio.shield(task)

    async def _load(self, version: Version, why: str) -> LoadedModel:
        key = (version.model, version.version)
        try:
            evicted = self._reserve(version)
            try:
                # Drained with nothing held: other loads are admitted meanwhile (their
                # warm-ups share the device's compute thread with what the victims still
                # run). This load builds only once its room is really free.
                while evicted:
                    await self._release(evicted.pop(), "evicted to stay within the memory budget")
                return await self._build_and_start(version, why)
            finally:
                self._reserved -= version.size
        except ModelLoadingError as exc:
            retry_at = time.monotonic() + LOAD_RETRY_S
            self._failed[key] = LoadFailure(type(exc), exc.reason, retry_at)
            raise

    async def _build_and_start(self, version: Version, why: str) -> LoadedModel:
        name = version.model
        started = time.perf_counter()
        module_class, module = await self._build_module(version)
        batching = self.settings.batching_for(name)
        half = HALF_TYPES.get(self.settings.dtype)
        compute = make_compute(module, module_class, version, self.device, half)
        executor = self._executors.for_device(self.device)
        await self._warm_up(name, version, module_class, compute, executor)
        forward_s = None
        if self.settings.compute == "auto" and self.device.type == "cpu":
            forward_s = await self._time_forward(
                name, version, module_class, compute, executor, batching.max_batch_size
            )
        mode, choice = choose_compute(self.settings.compute, self.device, forward_s)
        batcher = DynamicBatcher(
            f"{name}:{version.version}",
            compute,
            executor if mode == "thread" else None,
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
            InputPlan(name, module_class, batching.max_batch_size),
            mode,
            None if forward_s is None else forward_s * 1000,
        )
        self._models[(name, version.version)] = loaded
        self.ledger.track((name, version.version), batcher)
        self._failed.pop((name, version.version), None)
        logger.info(
            "loaded %s:%d on %s (%d bytes) in %.2fs%s",
            name,
            version.version,
            self.device,
            loaded.nbytes,
            time.perf_counter() - started,
            f": {why}" if why else "",
        )
        logger.info(
            "%s:%d computes %s (%s%s)",
            name,
            version.version,
            "inline" if mode == "inline" else "on its compute thread",
            ""
            if forward_s is None
            else f"forward {forward_s * 1000:.2f} ms at batch {batching.max_batch_size}, ",
            choice,
        )
        await self._notify(name)
        return loaded

    async def _build_module(self, version: Version) -> tuple[ModuleClass, nn.Module]:
        """The version's class and module; a failure becomes a sentence for clients."""
        try:
            module_class = await asyncio.to_thread(self.registry.module_class_of, version)
            return module_class, await asyncio.to_thread(self._build, version)
        except (IntegrityError, RegistryUnavailableError):
            raise  # DATA_LOSS and UNAVAILABLE say more than "failed to load"
        except Exception as exc:  # the class no longer builds, imports, or fits its checkpoint
            error = load_error(version, exc)
        # Raised outside the except block: chained, `exc` would keep the build's tensors.
        raise error

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
        inputs = _zeros(module_class, 1)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, forward_once, compute, inputs)  # type: ignore[arg-type]
            return
        except ModelOutputError as exc:  # our own sentence about what forward() returned
            reason = f"failed its warm-up forward pass: its class {exc.class_name!r} {exc.reason}"
            logger.warning("%s:%d %s", name, version.version, reason)
        except Exception as exc:  # user code failed on its own declared input spec
            logger.warning(
                "%s:%d failed its warm-up forward pass", name, version.version, exc_info=exc
            )
            # User code's text stays in the log: it may quote paths, data or secrets.
            reason = f"failed its warm-up forward pass ({SEE_LOG})"
        raise ModelLoadingError(name, str(version.version), reason)

    async def _time_forward(
        self,
        name: str,
        version: Version,
        module_class: ModuleClass,
        compute: Callable[..., object],
        executor: Executor,
        rows: int,
    ) -> float | None:
        """Median forward pass at `rows` rows on the compute thread (so a slow model never
        stalls the loop while it is timed); None when it fails (the thread then computes)."""
        inputs = _zeros(module_class, rows)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor,
                time_forward,
                compute,  # type: ignore[arg-type]
                inputs,
            )
        except ModelOutputError as exc:  # our own sentence says it all: no traceback
            logger.warning(
                "%s:%d failed its timed forward pass at %d rows: its class %r %s",
                name,
                version.version,
                rows,
                exc.class_name,
                exc.reason,
            )
        except Exception as exc:  # the warm-up passed at one row: load it, do not guess
            logger.warning(
                "%s:%d failed its timed forward pass at %d rows",
                name,
                version.version,
                rows,
                exc_info=exc,
            )
        return None

    def _reserve(self, version: Version) -> list[LoadedModel]:
        """Promise `version` the budget room it needs, taking it from the least recently used
        lazily loaded models; returns those, detached, for the caller to release.

        Synchronous on purpose: with no await between choosing victims and promising the
        room, concurrent loads each see the others' promises (`_reserved`) and never share
        room, and no lock is held while a victim drains its requests. A victim's memory
        stays counted through the promise until the caller has released it.
        """
        need = version.size
        if need > self._budget:
            raise ModelLoadingError(
                version.model,
                str(version.version),
                f"needs {need / 2**20:.1f} MiB, more than the memory budget of "
                f"{self._budget / 2**20:.0f} MiB",
            )
        free = self._budget - self._reserved - sum(m.nbytes for m in self._models.values())
        victims: list[LoadedModel] = []
        lazy = sorted((m for m in self._models.values() if not m.pinned), key=lambda m: m.last_used)
        for candidate in lazy:
            if free >= need:
                break
            victims.append(candidate)
            free += candidate.nbytes
        if free < need:
            pinned = [m for m in self._models.values() if m.pinned]
            held = sum(m.nbytes for m in pinned)
            if held + need > self._budget:
                raise MemoryBudgetFullError(
                    version.model,
                    str(version.version),
                    need,
                    self._budget,
                    held,
                    [f"{m.name}:{m.version.version}" for m in pinned],
                )
            raise ModelNotReadyError(  # not remembered as a failure: retrying is the answer
                version.model,
                str(version.version),
                "does not fit the memory budget while other models are loading; retry",
            )
        for victim in victims:
            self._detach((victim.name, victim.version.version))
        self._reserved += need
        return victims

    async def unload(self, model: str) -> int:
        """Unload every version of a model (which unpins it); in-flight requests finish
        first. Returns how many versions were loaded."""
        await self._settle_loads(model)
        keys = [key for key in self._models if key[0] == model]
        await self._drop(keys, "unload request")
        for ref in [r for r in self._refs if r[0] == model]:
            del self._refs[ref]
        return len(keys)

    async def _settle_loads(self, model: str | None = None) -> None:
        """Wait for loads in progress (of one model, or all), whatever their outcome, so that
        an unload or shutdown is not undone by a load finishing right after it."""
        pending = [t for key, t in self._loading.items() if model is None or key[0] == model]
        for task in pending:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    def _detach(self, key: Key) -> LoadedModel | None:
        """Take a loaded model out of service at once: no new request reaches it, and the
        refs that pointed at it are forgotten (the alias refresher must not reload it)."""
        loaded = self._models.pop(key, None)
        for ref in [r for r, number in self._refs.items() if (r[0], number) == key]:
            del self._refs[ref]
        return loaded

    async def _drop(self, keys: list[Key], why: str) -> None:
        """Detach these loaded models together, then release them one after the other."""
        detached = [loaded for loaded in map(self._detach, keys) if loaded is not None]
        while detached:
            await self._release(detached.pop(), why)  # popped: the list keeps no weights

    async def _release(self, loaded: LoadedModel, why: str) -> None:
        """Let a detached model's queued and in-flight requests finish, then let go of it.

        Callers pass the model without keeping a reference, so its weights are freed by
        reference counting when this frame lets go. No `gc.collect()`: a full collection
        holds the GIL (the event loop with it, whichever thread runs it) for 100 ms and
        more on a server's heap, and nothing of ours keeps a model in a reference cycle
        (tested: the module is gone when unload returns, with the collector disabled).
        """
        key = (loaded.name, loaded.version.version)
        try:
            await loaded.batcher.stop(drain=True)
        finally:
            self.ledger.retire(key, loaded.batcher)  # also lets go of the batcher (and weights)
        logger.info("unloaded %s:%d (%d bytes): %s", *key, loaded.nbytes, why)
        on_cuda = loaded.device.type == "cuda"
        del loaded
        if on_cuda:
            torch.cuda.empty_cache()  # the freed blocks back to the driver, for other processes
        await self._notify(key[0])

    async def _notify(self, name: str) -> None:
        if self._on_status is not None:
            await self._on_status(name, any(m.name == name for m in self._models.values()))

    # -- alias moves -----------------------------------------------------------------------

    def start(self) -> None:
        """Start re-reading aliases of loaded models in the background."""
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alias_refresh_s)
            try:
                await self.refresh_aliases()
            except Exception as exc:  # a bug: logged once, and the refreshes go on
                self._trouble(("", ""), _bug(exc), "alias refresh failed unexpectedly", exc)
            else:
                self._trouble_over(("", ""), "alias refresh works again")

    async def refresh_aliases(self) -> None:
        """Re-resolve alias and default refs; load a moved target, then swap it in.

        Requests keep going to the old version until the new one is warm, and the
        old one is unloaded only after its in-flight requests finish (drain); the new
        version is pinned when the old one was. Trouble with one ref (the registry
        unreachable, the target gone, a target that does not load) keeps it where it is
        and is logged once per change of condition, not every refresh.
        """
        for where in [w for w in self._troubles if w != ("", "") and w not in self._refs]:
            del self._troubles[where]  # unloaded since: a new trouble there is news again
        for (model, ref), number in list(self._refs.items()):
            if isinstance(parse_ref(ref), int):
                continue
            where, keeping = (model, ref), f"keeping {model}:{ref or 'default'} at version {number}"
            try:
                version = await asyncio.to_thread(self.registry.checkpoints.resolve, model, ref)
                if version.version == number or (model, number) not in self._models:
                    self._trouble_over(where, f"{model}:{ref or 'default'} resolves again")
                    continue
                # No local name for the old version: the swap below unloads it, and its
                # weights go when the cache lets go of it.
                pinned = self._models[(model, number)].pinned
                mover = _mover(ref, version, self.registry.checkpoints.default_alias)
                new = await self._ensure_loaded(
                    version, f"{mover} moves here from version {number}"
                )
            except (RegistryError, ServerError) as exc:  # expected: one sentence says it all
                self._trouble(where, (type(exc), str(exc)), f"{keeping}: {exc}")
                continue
            except Exception as exc:  # one model's trouble must not stop the others' refresh
                self._trouble(where, _bug(exc), f"{keeping}: its refresh failed unexpectedly", exc)
                continue
            self._trouble_over(where, f"{model}:{ref or 'default'} resolves again")
            new.pinned = new.pinned or pinned
            del new
            self._refs[(model, ref)] = version.version
            logger.info("%s: %s moved from version %d to %d", model, mover, number, version.version)
            if (model, number) not in {(m, n) for (m, _), n in self._refs.items()}:
                await self._drop([(model, number)], f"{mover} moved to version {version.version}")

    def _trouble(
        self,
        where: tuple[str, str],
        condition: Hashable,
        message: str,
        exc: BaseException | None = None,
    ) -> None:
        """Log a refresh trouble when its condition is new for `where`: an expected one as
        one line, a bug (`exc`) with its traceback. The same condition again stays quiet."""
        if self._troubles.get(where) == condition:
            return
        self._troubles[where] = condition
        if exc is None:
            logger.warning("%s", message)
        else:
            logger.error("%s", message, exc_info=exc)

    def _trouble_over(self, where: tuple[str, str], message: str) -> None:
        """Say once that a logged trouble has passed."""
        if self._troubles.pop(where, None) is not None:
            logger.info("%s", message)

    async def close(self) -> None:
        """Stop refreshing and unload everything (in-flight requests finish)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self._settle_loads()
        await self._drop(list(self._models), "server stopping")


def _zeros(module_class: ModuleClass, rows: int) -> dict[str, torch.Tensor]:
    """Zero inputs of the class's specs: `rows` rows where dimension 0 is free, 1 for any
    other free dimension."""
    return {
        spec.name: torch.zeros(
            [rows if i == 0 and d == -1 else 1 if d == -1 else d for i, d in enumerate(spec.shape)],
            dtype=parse_dtype(spec.dtype),
        )
        for spec in module_class.inputs
    }


def _bug(exc: BaseException) -> Hashable:
    """What makes an unexpected exception the same bug again: its type and where it was
    raised (its message may differ every time)."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = (frames[-1].filename, frames[-1].lineno) if frames else None
    return (type(exc), place)


def _mover(ref: str, version: Version, default_alias: str) -> str:
    """What moved a ref to `version`, for the log: its alias, or the newest version."""
    if ref:
        return f"alias {ref!r}"
    if default_alias in version.aliases:
        return f"alias {default_alias!r}"
    return "the latest version"
