"""Dynamic batching for one loaded model: queue requests, run them as one forward pass, split back.

Batching rule (DESIGN.md "Inference engine"): when the worker is idle, a lone
request runs at once; requests that arrive while it computes wait in the queue
and form the next batch. Only when there is evidence of load (more than one
request waiting, or the previous batch held more than one) does a batch wait
for more arrivals, and never past `max_queue_delay_s` after its oldest request
was queued. So batches grow with load and latency stays low without it.

Where a batch computes (DESIGN.md): on a compute thread (an executor), with one
cross-thread wake-up to start the batch and one to deliver its results; or, for a
model whose forward pass is measured tiny, inline on the event loop (no executor),
which saves both wake-ups and blocks the loop no longer than that forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, fields
from typing import Final, Generic, TypeVar

import torch

from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.errors import (
    DeadlineExceededError,
    ModelNotReadyError,
    QueueFullError,
)

logger = logging.getLogger(__name__)

Compute = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""A forward pass over a batch: named inputs in, named outputs out, dim 0 kept (one output
row per input row: the compute function raises instead of returning anything else)."""

DURATION_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds of the duration histograms, in seconds; one more bucket holds the rest."""
_BOUNDS_NS: Final = tuple(round(bound * 1e9) for bound in DURATION_BUCKETS_S)
# The same bounds on time.monotonic()'s scale (seconds), for the per-request histograms.
_BOUNDS_S: Final = tuple(bound / 1e9 for bound in _BOUNDS_NS)


def duration_bucket(ns: int) -> int:
    """Index of the histogram bucket a duration falls in (Prometheus `le`: bound included)."""
    return bisect_left(_BOUNDS_NS, ns)


def _no_observations() -> list[int]:
    return [0] * (len(_BOUNDS_NS) + 1)


def split(
    outputs: Mapping[str, torch.Tensor], sizes: Sequence[int]
) -> list[dict[str, torch.Tensor]]:
    """Split batch outputs along dim 0 into one dict per request (views, not copies).

    The outputs keep the batch's rows: `Compute` promises it (the model's compute function
    checks what forward() returned before it gets here)."""
    if len(sizes) == 1:
        return [outputs if type(outputs) is dict else dict(outputs)]
    parts = {name: tensor.split(list(sizes)) for name, tensor in outputs.items()}
    return [{name: parts[name][index] for name in parts} for index in range(len(sizes))]


def signature_of(inputs: Mapping[str, torch.Tensor]) -> tuple[int, Hashable]:
    """Rows and merge key of a request `InputPlan` checked (its inputs agree on dimension
    0): requests merge only when names, dtypes and shapes beyond dimension 0 agree."""
    if len(inputs) == 1:
        name, tensor = next(iter(inputs.items()))
        return tensor.shape[0], ((name, tensor.dtype, tensor.shape[1:]),)
    parts = tuple((name, inputs[name].dtype, inputs[name].shape[1:]) for name in sorted(inputs))
    return next(iter(inputs.values())).shape[0], parts


class _Request:
    """One queued request. The heap holds (priority level, arrival, request) tuples, which
    compare in C; arrival numbers are unique, so requests themselves are never compared."""

    __slots__ = ("deadline", "enqueued", "future", "inputs", "level", "rows", "seq", "signature")

    def __init__(
        self,
        level: int,
        seq: int,
        inputs: Mapping[str, torch.Tensor],
        rows: int,
        signature: Hashable,
        future: asyncio.Future[dict[str, torch.Tensor]],
        deadline: float | None,
        enqueued: float,
    ) -> None:
        self.level = level
        self.seq = seq
        self.inputs = inputs
        self.rows = rows
        self.signature = signature
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued


_Entry = tuple[int, int, _Request]


@dataclass(frozen=True)
class BatcherStats:
    """Cumulative counters of one batcher; durations in nanoseconds (Triton's units)."""

    requests: int  # accepted into the queue
    rejected: int  # refused at the door: queue full or deadline already passed
    success: int  # answered with outputs
    fail: int  # answered with an error: compute failed, deadline passed in queue, stopped
    cancelled: int  # the caller went away before its request was computed
    rows: int  # rows computed successfully (Triton's inference_count)
    batches: int  # forward passes (Triton's execution_count)
    batch_sizes: Mapping[int, int]  # rows in a forward pass -> number of such passes
    batch_infer_ns: Mapping[int, int]  # rows in a forward pass -> time in forward()
    queued: int  # waiting now
    queue_ns: int  # time computed requests waited in the queue
    success_ns: int  # queue + compute time of successful requests
    fail_ns: int  # time failed requests spent in the batcher
    compute_input_ns: int  # collating inputs
    compute_infer_ns: int  # forward()
    compute_output_ns: int  # splitting outputs
    last_inference_ms: int  # wall clock of the last forward pass, ms since epoch; 0 if none
    # Observations per DURATION_BUCKETS_S bucket (not cumulative; the last is "more"):
    request_buckets: tuple[int, ...]  # queue + compute of each successful request
    queue_buckets: tuple[int, ...]  # queue time of each successful request
    compute_buckets: tuple[int, ...]  # forward() of each successful forward pass

    @property
    def compute_ns(self) -> int:
        """Collate + forward + split."""
        return self.compute_input_ns + self.compute_infer_ns + self.compute_output_ns

    def plus(self, other: BatcherStats) -> BatcherStats:
        """Both snapshots' counts together (one model version served by successive batchers)."""
        values: dict[str, object] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "last_inference_ms":
                values[f.name] = max(mine, theirs)
            elif isinstance(mine, tuple):
                values[f.name] = tuple(a + b for a, b in zip(mine, theirs, strict=True))
            elif isinstance(mine, Mapping):
                values[f.name] = {k: mine.get(k, 0) + theirs.get(k, 0) for k in {*mine, *theirs}}
            else:
                values[f.name] = mine + theirs
        return BatcherStats(**values)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Counters:
    """Mutable counters behind `BatcherStats`; touched only on the event loop thread."""

    requests: int = 0
    rejected: int = 0
    success: int = 0
    fail: int = 0
    cancelled: int = 0
    rows: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    batch_infer_ns: Counter[int] = field(default_factory=Counter)
    queue_ns: int = 0
    success_ns: int = 0
    fail_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    last_inference_ms: int = 0
    request_buckets: list[int] = field(default_factory=_no_observations)
    queue_buckets: list[int] = field(default_factory=_no_observations)
    compute_buckets: list[int] = field(default_factory=_no_observations)


K = TypeVar("K", bound=Hashable)

_BatchResult = tuple[list[dict[str, torch.Tensor]], tuple[int, int, int]]


def _run_batch(compute: Compute, requests: Sequence[_Request]) -> _BatchResult:
    """Collate, forward and split (on the compute thread, or inline); returns the outputs
    and the three timings. Requests of one batch share a signature: the same input names."""
    start = time.perf_counter_ns()
    with torch.inference_mode():
        first = requests[0].inputs
        if len(requests) == 1:
            batch = first
        else:
            batch = {name: torch.cat([r.inputs[name] for r in requests]) for name in first}
        collated = time.perf_counter_ns()
        outputs = compute(batch)  # type: ignore[arg-type]
        computed = time.perf_counter_ns()
        results = split(outputs, [r.rows for r in requests])
    return results, (collated - start, computed - collated, time.perf_counter_ns() - computed)


def _check_options(
    max_batch_size: int, max_queue_delay_s: float, preferred: Sequence[int], max_queue_size: int
) -> None:
    """Refuse a batcher configuration that cannot work, with a sentence saying why."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if max_queue_delay_s < 0:
        raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s}")
    if max_queue_size < 1:
        raise ValueError(f"max_queue_size must be at least 1, got {max_queue_size}")
    if any(not 1 <= size <= max_batch_size for size in preferred):
        raise ValueError(
            f"preferred_batch_sizes {list(preferred)} must lie in 1..max_batch_size "
            f"({max_batch_size})"
        )


class DynamicBatcher:
    """Batches one model's requests along dim 0 and runs them as one forward pass each.

    Lifecycle is explicit: `start()` on a running loop, then `submit()` from any
    coroutine on that loop, then `await stop()`. Priority follows Triton: a
    lower number runs first and 0 means `default_priority_level`. Requests whose
    input names, dtypes or shapes beyond dim 0 differ are never merged. With an
    `executor`, forward passes run on its thread; with None, inline on the loop (only
    for forward passes short enough not to hold up everything else on it).
    """

    def __init__(
        self,
        name: str,
        compute: Compute,
        executor: Executor | None,
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        default_priority_level: int = 0,
    ) -> None:
        _check_options(max_batch_size, max_queue_delay_s, preferred_batch_sizes, max_queue_size)
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred_batch_sizes = frozenset(preferred_batch_sizes)
        self.max_queue_size = max_queue_size
        self.default_priority_level = default_priority_level
        self._compute = compute
        self._executor = executor
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._counters = _Counters()
        # Safe outside a loop since Python 3.10: an Event binds to its loop on first wait.
        self._wakeup = asyncio.Event()
        # While a batch waits out its window, arrivals wake the worker only once enough
        # requests queued to fill it: a wake-up per arrival costs a task switch each.
        self._wake_at_queued = 1
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: list[_Request] = []
        self._last_batch_requests = 0
        self._accepting = False
        self._closing = False
        self._draining = False

    @property
    def inline(self) -> bool:
        """Whether forward passes run on the event loop rather than a compute thread."""
        return self._executor is None

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._task is not None or self._closing:
            raise RuntimeError(f"batcher of model {self.name!r} can only be started once")
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"batcher[{self.name}]")
        self._accepting = True

    async def stop(self, *, drain: bool = False) -> None:
        """Stop accepting requests, then fail (or with `drain`, finish) the queued ones.

        The batch already computing always finishes. Cancelling `stop()` (e.g. from
        `asyncio.wait_for`) cancels the worker too: every waiter still pending then
        gets `ModelNotReadyError` and the forward pass result is discarded.
        """
        self._accepting = False
        self._closing = True
        self._draining = self._draining or drain
        if not drain:
            self._fail_queued()
        if self._task is None:
            return
        self._wakeup.set()
        with contextlib.suppress(Exception):  # the worker logged it; stop() must not fail
            await self._task

    async def submit(
        self,
        inputs: Mapping[str, torch.Tensor],
        rows: int,
        signature: Hashable,
        *,
        deadline: float | None = None,
        priority: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Queue one request its caller checked (`InputPlan.check`) and return its outputs.

        `rows` (1 to max_batch_size) and `signature` must be what `InputPlan.check` (or
        `signature_of`) returns for `inputs`. `deadline` is on `time.monotonic()`; a
        request still queued when it passes gets `DeadlineExceededError` and is never
        computed. A full queue raises `QueueFullError` at once; after `stop()`,
        `ModelNotReadyError`.
        """
        if not self._accepting:
            raise ModelNotReadyError(self.name, reason="is not accepting requests (not running)")
        if priority < 0:
            raise InvalidInputError(f"priority must be >= 0, got {priority}")
        heap, counters = self._heap, self._counters
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            counters.rejected += 1
            raise DeadlineExceededError(self.name)
        if len(heap) >= self.max_queue_size:
            counters.rejected += 1
            raise QueueFullError(self.name, len(heap))
        assert self._loop is not None  # set by start(), which _accepting implies
        future: asyncio.Future[dict[str, torch.Tensor]] = self._loop.create_future()
        level, seq = priority or self.default_priority_level, next(self._seq)
        request = _Request(level, seq, inputs, rows, signature, future, deadline, now)
        heapq.heappush(heap, (level, seq, request))
        counters.requests += 1
        if len(heap) >= self._wake_at_queued:
            self._wakeup.set()
        return await future

    def stats(self) -> BatcherStats:
        """A snapshot of the cumulative counters."""
        c = self._counters
        values = {f.name: getattr(c, f.name) for f in fields(c)}
        values.update(batch_sizes=dict(c.batch_sizes), batch_infer_ns=dict(c.batch_infer_ns))
        for name in ("request_buckets", "queue_buckets", "compute_buckets"):
            values[name] = tuple(values[name])
        return BatcherStats(**values, batches=c.batch_sizes.total(), queued=len(self._heap))

    async def _run(self) -> None:
        """Worker: wait for work, collect a batch, compute it; forever until stopped."""
        try:
            while True:
                if not self._heap:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = await self._collect()
                if batch:
                    await self._execute(batch)
                self._inflight = []
        except Exception:
            logger.exception("batcher of model %r crashed", self.name)
            raise
        finally:
            # Whatever ends the worker (stop, cancellation, a bug), nobody waits forever.
            self._fail(self._inflight, ModelNotReadyError(self.name, reason="was stopped"))
            self._fail_queued()

    async def _collect(self) -> list[_Request]:
        """Pop the next batch: one signature, priority order, at most max_batch_size rows."""
        # Kept on self so that a stop or crash mid-window still answers these requests.
        batch: list[_Request] = []
        self._inflight = batch
        rows = 0
        loaded = self._last_batch_requests > 1
        while True:
            rows = self._take(batch, rows)
            if not batch:
                return batch
            loaded = loaded or len(batch) > 1
            if not self._should_wait(rows, loaded):
                break
            # The wake-up threshold counts requests: estimate them from the rows per request.
            missing = math.ceil((self.max_batch_size - rows) * len(batch) / max(rows, 1))
            if not await self._wait_for_arrival(self._window_end(batch), missing):
                break
            if self._closing and not self._draining:
                self._fail(batch, ModelNotReadyError(self.name, reason="was stopped"))
                return []
        self._prune(batch)
        return self._trim_to_preferred(batch)

    def _prune(self, batch: list[_Request]) -> None:
        """Drop requests that expired or were cancelled while the batch waited for more."""
        now = time.monotonic()
        keep = []
        for request in batch:
            if request.future.done():
                self._counters.cancelled += 1
            elif request.deadline is not None and request.deadline <= now:
                self._fail([request], DeadlineExceededError(self.name))
            else:
                keep.append(request)
        if len(keep) != len(batch):
            batch[:] = keep

    def _take(self, batch: list[_Request], rows: int) -> int:
        """Move waiting requests that match the batch's signature into it; returns its rows."""
        heap, skipped = self._heap, []
        signature = batch[0].signature if batch else None
        limit = self.max_batch_size
        now = time.monotonic()
        while heap:
            request = heap[0][2]
            if request.future.done():  # cancelled: the caller went away
                heapq.heappop(heap)
                self._counters.cancelled += 1
            elif request.deadline is not None and request.deadline <= now:
                heapq.heappop(heap)
                self._fail([request], DeadlineExceededError(self.name))
            elif signature is not None and request.signature != signature:
                skipped.append(heapq.heappop(heap))
            elif rows + request.rows > limit:
                break
            else:
                signature = request.signature
                heapq.heappop(heap)
                batch.append(request)
                rows += request.rows
        for entry in skipped:
            heapq.heappush(heap, entry)
        return rows

    def _should_wait(self, rows: int, loaded: bool) -> bool:
        """Whether a batch should wait for more requests before it runs."""
        return (
            loaded
            and not self._closing
            and self.max_queue_delay_s > 0
            and rows < self.max_batch_size
            and rows not in self.preferred_batch_sizes
        )

    def _window_end(self, batch: list[_Request]) -> float:
        """When the batch must run: its oldest request's delay bound, or an earlier deadline."""
        end = min(request.enqueued for request in batch) + self.max_queue_delay_s
        deadlines = [request.deadline for request in batch if request.deadline is not None]
        return min(end, *deadlines) if deadlines else end

    async def _wait_for_arrival(self, until: float, missing_requests: int) -> bool:
        """Wait until about `missing_requests` more requests queued (or stop) but no later
        than `until`; False when the window closed."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            return False
        self._wakeup.clear()
        self._wake_at_queued = max(1, missing_requests)
        try:
            async with asyncio.timeout(remaining):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        finally:
            self._wake_at_queued = 1
        return True

    def _trim_to_preferred(self, batch: list[_Request]) -> list[_Request]:
        """Cut the batch to its longest prefix with a preferred size; requeue the rest."""
        if not self.preferred_batch_sizes:
            return batch
        rows, cut = 0, 0
        for index, request in enumerate(batch, start=1):
            rows += request.rows
            if rows in self.preferred_batch_sizes:
                cut = index
        if cut == 0 or cut == len(batch):
            return batch
        for request in batch[cut:]:  # back in the queue in their old place
            heapq.heappush(self._heap, (request.level, request.seq, request))
        del batch[cut:]
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        """Run one batch (inline or on the compute thread) and resolve every request's future."""
        started = time.monotonic()
        self._last_batch_requests = len(batch)
        try:
            if self._executor is None:
                results, timings = _run_batch(self._compute, batch)
            else:
                results, timings = await self._on_thread(self._executor, batch)
        except Exception as exc:  # the model's failure is every request's failure
            self._fail(batch, exc)
        else:
            self._record_batch(batch, started, timings)
            for request, outputs in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(outputs)
        if self._executor is None:
            # An inline batch held the loop: let everything else run (callers, health checks,
            # other models) before the next one; answered callers that ask again join it.
            await asyncio.sleep(0)

    async def _on_thread(self, executor: Executor, batch: list[_Request]) -> _BatchResult:
        """`_run_batch` on the compute thread: one wake-up there, one call back here.

        Leaner than `run_in_executor`, which chains a concurrent future to an asyncio
        one (two more futures and their callbacks per batch)."""
        loop = self._loop
        assert loop is not None
        done: asyncio.Future[_BatchResult] = loop.create_future()
        compute = self._compute

        def job() -> None:
            try:
                result: _BatchResult | BaseException = _run_batch(compute, batch)
            except BaseException as exc:  # delivered to the loop, like any executor would
                result = exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, done, result)

        executor.submit(job)
        return await done

    def _record_batch(
        self, batch: list[_Request], started: float, timings: tuple[int, int, int]
    ) -> None:
        """Add one successful batch to the counters (histograms: one increment per request)."""
        c, now = self._counters, time.monotonic()
        queue_buckets, request_buckets = c.queue_buckets, c.request_buckets
        rows, enqueued_sum = 0, 0.0
        for request in batch:
            rows += request.rows
            enqueued = request.enqueued
            enqueued_sum += enqueued
            queue_buckets[bisect_left(_BOUNDS_S, started - enqueued)] += 1
            request_buckets[bisect_left(_BOUNDS_S, now - enqueued)] += 1
        count = len(batch)
        c.queue_ns += int((started * count - enqueued_sum) * 1e9)
        c.success_ns += int((now * count - enqueued_sum) * 1e9)
        c.compute_buckets[duration_bucket(timings[1])] += 1
        c.batch_sizes[rows] += 1
        c.batch_infer_ns[rows] += timings[1]
        c.compute_input_ns += timings[0]
        c.compute_infer_ns += timings[1]
        c.compute_output_ns += timings[2]
        c.rows += rows
        c.success += count
        c.last_inference_ms = time.time_ns() // 1_000_000  # wall clock: a timestamp, not a window

    def _fail(self, requests: list[_Request], error: BaseException) -> None:
        """Set `error` on every request still waiting for an answer."""
        now = time.monotonic()
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
                self._counters.fail += 1
                self._counters.fail_ns += int((now - request.enqueued) * 1e9)

    def _fail_queued(self) -> None:
        """Fail every queued request: the batcher is stopping without draining."""
        queued, self._heap = self._heap, []
        self._fail(
            [entry[2] for entry in queued], ModelNotReadyError(self.name, reason="was stopped")
        )


def _settle(future: asyncio.Future[_BatchResult], result: _BatchResult | BaseException) -> None:
    """On the loop: hand a compute thread's outcome to the waiting worker (if it still waits)."""
    if future.done():  # the worker was cancelled (stop() timed out)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class StatsLedger(Generic[K]):
    """Cumulative statistics per key (a model version) across the batchers that served it.

    A version loaded again gets a new batcher whose counters start at zero; the ledger
    adds what its stopped batchers counted, so totals never go backwards (as Prometheus
    counters must) and outlive an unload. Of keys not running again, the `keep` most
    recently stopped are remembered. A lock keeps each snapshot whole even when a scrape
    runs on another thread: a batcher is never counted twice, or missed, while it stops.
    """

    def __init__(self, keep: int = 256) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._running: list[tuple[K, DynamicBatcher]] = []
        self._stopped: dict[K, BatcherStats] = {}

    def track(self, key: K, batcher: DynamicBatcher) -> None:
        """Count a started batcher under `key` until `retire`."""
        with self._lock:
            self._running.append((key, batcher))

    def retire(self, key: K, batcher: DynamicBatcher) -> None:
        """Fold a stopped batcher's final counts into its key's totals and let go of it
        (once: a batcher already retired is not counted again)."""
        final = batcher.stats()
        with self._lock:
            if not any(b is batcher for _, b in self._running):
                return
            self._running = [(k, b) for k, b in self._running if b is not batcher]
            previous = self._stopped.pop(key, None)  # re-inserted last: the newest
            self._stopped[key] = final if previous is None else previous.plus(final)
            running = {k for k, _ in self._running}
            # A key running again keeps its past, or its counters would go backwards.
            forgettable = [k for k in self._stopped if k not in running]
            for old in forgettable[: max(0, len(forgettable) - self._keep)]:
                del self._stopped[old]

    def totals(self) -> dict[K, BatcherStats]:
        """Every key's statistics: its stopped batchers' plus its running ones'."""
        with self._lock:
            totals = dict(self._stopped)
            for key, batcher in self._running:
                stats = batcher.stats()
                totals[key] = stats if key not in totals else totals[key].plus(stats)
        return totals
