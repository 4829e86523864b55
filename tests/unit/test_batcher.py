"""DynamicBatcher with a real nn.Linear on a real thread: merging, ordering, failures, lifecycle.

Concurrency is steered with threading.Event gates inside the forward pass, not
with sleeps: a gated forward pass holds the worker busy while the test queues
requests, exactly the situation in which batches form.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch
from torch import nn

from moduleserve.server.engine.batcher import (
    DURATION_BUCKETS_S,
    DynamicBatcher,
    StatsLedger,
    duration_bucket,
    signature_of,
    split,
)
from moduleserve.server.errors import (
    DeadlineExceededError,
    ModelNotReadyError,
    QueueFullError,
)

TIMEOUT = 2.0


def linear() -> nn.Linear:
    """y = 2x + 1, so 4.0 -> 9.0 exactly (LitServe's batching test model)."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(1.0)
    return model.eval()


class GatedModel:
    """The compute callable: runs `model`, records each batch, and can hold the worker."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model or linear()
        self.batches: list[list[float]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def hold(self) -> None:
        """Make the next forward pass block until `open()`."""
        self.entered.clear()
        self.release.clear()

    def open(self) -> None:
        self.release.set()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, TIMEOUT), "forward pass never started"

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.batches.append(inputs["x"].flatten().tolist())
        self.entered.set()
        assert self.release.wait(TIMEOUT), "test never released the forward pass"
        return {"y": self.model(inputs["x"])}


@asynccontextmanager
async def running(compute: Callable[..., Any], **options: Any) -> AsyncIterator[DynamicBatcher]:
    """A started batcher on a one-thread executor, stopped and shut down afterwards."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = DynamicBatcher("m", compute, executor, **options)
        batcher.start()
        try:
            yield batcher
        finally:
            await asyncio.wait_for(batcher.stop(), TIMEOUT)


def row(value: float) -> dict[str, torch.Tensor]:
    """One request of one row."""
    return {"x": torch.tensor([[value]])}


async def ask(
    batcher: DynamicBatcher, inputs: Mapping[str, torch.Tensor], **kw: Any
) -> dict[str, torch.Tensor]:
    """One request as the engine sends it: rows and merge key from the checked inputs."""
    rows, signature = signature_of(inputs)
    return await batcher.submit(inputs, rows, signature, **kw)


def submit(batcher: DynamicBatcher, inputs: Mapping[str, torch.Tensor], **kw: Any) -> asyncio.Task:
    """`ask` as a task: queued on the next loop turn, awaited later."""
    return asyncio.create_task(ask(batcher, inputs, **kw))


async def queued(batcher: DynamicBatcher, count: int) -> None:
    """Let just-created tasks reach the queue (each needs one loop turn)."""
    for _ in range(100):
        if batcher.stats().queued == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"expected {count} queued, have {batcher.stats().queued}")


@pytest.mark.asyncio
async def test_lone_request_runs_at_once_as_a_batch_of_one() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8, max_queue_delay_s=10.0) as batcher:
        result = await asyncio.wait_for(ask(batcher, row(4.0)), TIMEOUT)
        assert result["y"].tolist() == [[9.0]]
        stats = batcher.stats()
    assert stats.batch_sizes == {1: 1}
    assert (stats.requests, stats.success, stats.rows, stats.batches) == (1, 1, 1, 1)
    assert stats.last_inference_ms > 0 and stats.compute_infer_ns > 0


@pytest.mark.asyncio
async def test_requests_arriving_during_compute_are_merged() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, row(4.0))
        await model.wait_entered()
        others = [submit(batcher, row(v)) for v in (5.0, 6.0, 7.0)]
        await queued(batcher, 3)
        model.open()
        results = await asyncio.wait_for(asyncio.gather(first, *others), TIMEOUT)
        stats = batcher.stats()
    assert [r["y"].item() for r in results] == [9.0, 11.0, 13.0, 15.0]
    assert model.batches == [[4.0], [5.0, 6.0, 7.0]]
    assert stats.batch_sizes == {1: 1, 3: 1}
    assert stats.queue_ns > 0 and stats.success == 4


@pytest.mark.asyncio
async def test_multi_row_requests_fill_up_to_max_batch_size() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=4) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        a = submit(batcher, {"x": torch.tensor([[1.0], [2.0]])})
        b = submit(batcher, {"x": torch.tensor([[3.0], [4.0]])})
        c = submit(batcher, {"x": torch.tensor([[5.0], [6.0]])})
        await queued(batcher, 3)
        model.open()
        results = await asyncio.wait_for(asyncio.gather(first, a, b, c), TIMEOUT)
        stats = batcher.stats()
    assert model.batches == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0]]
    assert [r["y"].flatten().tolist() for r in results[1:]] == [[3, 5], [7, 9], [11, 13]]
    assert stats.batch_sizes == {1: 1, 4: 1, 2: 1} and stats.rows == 7


@pytest.mark.asyncio
async def test_under_load_a_batch_waits_for_arrivals_within_the_window() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=4, max_queue_delay_s=10.0) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        early = [submit(batcher, row(v)) for v in (1.0, 2.0)]
        await queued(batcher, 2)
        model.open()
        await asyncio.wait_for(first, TIMEOUT)
        # The worker now holds [1, 2] (evidence of load) and waits for more: these join it,
        # and reaching max_batch_size runs it long before the 10 s window ends.
        late = [submit(batcher, row(v)) for v in (3.0, 4.0)]
        await asyncio.wait_for(asyncio.gather(*early, *late), TIMEOUT)
    assert model.batches == [[0.0], [1.0, 2.0, 3.0, 4.0]]


@pytest.mark.asyncio
async def test_reaching_a_preferred_size_ends_the_window() -> None:
    model = GatedModel()
    options = {"max_batch_size": 8, "max_queue_delay_s": 10.0, "preferred_batch_sizes": [2]}
    async with running(model, **options) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        pair = [submit(batcher, row(v)) for v in (1.0, 2.0)]
        await queued(batcher, 2)
        model.open()
        await asyncio.wait_for(asyncio.gather(first, *pair), TIMEOUT)
    assert model.batches == [[0.0], [1.0, 2.0]]


@pytest.mark.asyncio
async def test_batches_are_cut_to_the_largest_preferred_size() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8, preferred_batch_sizes=[2, 4]) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        rest = [submit(batcher, row(float(v))) for v in range(1, 7)]
        await queued(batcher, 6)
        model.open()
        await asyncio.wait_for(asyncio.gather(first, *rest), TIMEOUT)
    assert model.batches == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0]]


@pytest.mark.asyncio
async def test_different_shapes_dtypes_and_names_are_never_merged() -> None:
    model = GatedModel(model=lambda x: x * 2)
    seen: list[dict[str, tuple]] = []

    def compute(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append({k: (tuple(v.shape), v.dtype) for k, v in inputs.items()})
        return model({"x": next(iter(inputs.values()))})

    async with running(compute, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, {"x": torch.ones(1, 2)})
        await model.wait_entered()
        requests = [
            {"x": torch.ones(1, 2)},
            {"x": torch.ones(1, 3)},
            {"x": torch.ones(1, 2, dtype=torch.float64)},
            {"z": torch.ones(1, 2)},
            {"x": torch.ones(2, 2)},
        ]
        tasks = [submit(batcher, inputs) for inputs in requests]
        await queued(batcher, 5)
        model.open()
        results = await asyncio.wait_for(asyncio.gather(first, *tasks), TIMEOUT)
    # The two float32 "x" of width 2 merge (1 + 2 rows); the others run alone, in arrival order.
    assert seen[1:] == [
        {"x": ((3, 2), torch.float32)},
        {"x": ((1, 3), torch.float32)},
        {"x": ((1, 2), torch.float64)},
        {"z": ((1, 2), torch.float32)},
    ]
    for inputs, result in zip([{"x": torch.ones(1, 2)}, *requests], results, strict=True):
        value = next(iter(inputs.values()))
        assert torch.equal(result["y"], value * 2)


@pytest.mark.asyncio
async def test_full_queue_refuses_at_once() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=1, max_queue_size=2) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        waiting = [submit(batcher, row(v)) for v in (1.0, 2.0)]
        await queued(batcher, 2)
        with pytest.raises(QueueFullError) as err:
            await ask(batcher, row(3.0))
        assert str(err.value) == "model 'm': queue is full (2 requests waiting), retry later"
        model.open()
        await asyncio.wait_for(asyncio.gather(first, *waiting), TIMEOUT)
        assert batcher.stats().rejected == 1


@pytest.mark.asyncio
async def test_deadline_passed_in_queue_is_never_computed() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        doomed = submit(batcher, row(1.0), deadline=time.monotonic() + 0.05)
        alive = submit(batcher, row(2.0), deadline=time.monotonic() + 60)
        await queued(batcher, 2)
        await asyncio.sleep(0.1)  # the one wait on the clock: let the short deadline pass
        model.open()
        with pytest.raises(DeadlineExceededError, match="deadline passed before"):
            await asyncio.wait_for(doomed, TIMEOUT)
        assert (await asyncio.wait_for(alive, TIMEOUT))["y"].item() == 5.0
        await first
        stats = batcher.stats()
    assert model.batches == [[0.0], [2.0]]
    assert (stats.success, stats.fail) == (2, 1)


@pytest.mark.asyncio
async def test_deadline_already_passed_is_refused_at_once() -> None:
    model = GatedModel()
    async with running(model) as batcher:
        with pytest.raises(DeadlineExceededError):
            await ask(batcher, row(1.0), deadline=time.monotonic() - 1)
    assert model.batches == []


@pytest.mark.asyncio
async def test_cancelled_request_is_dropped_before_compute() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        gone = submit(batcher, row(1.0))
        kept = submit(batcher, row(2.0))
        await queued(batcher, 2)
        gone.cancel()
        model.open()
        assert (await asyncio.wait_for(kept, TIMEOUT))["y"].item() == 5.0
        await first
        assert batcher.stats().cancelled == 1
    assert model.batches == [[0.0], [2.0]]


@pytest.mark.asyncio
async def test_request_cancelled_while_its_batch_waits_is_dropped() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=3, max_queue_delay_s=10.0) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        gone, kept = submit(batcher, row(1.0)), submit(batcher, row(2.0))
        await queued(batcher, 2)
        model.open()
        await asyncio.wait_for(first, TIMEOUT)  # the worker now holds [1, 2] in its window
        gone.cancel()
        last = submit(batcher, row(3.0))  # fills the batch to 3 rows: it runs without 1
        results = await asyncio.wait_for(asyncio.gather(kept, last), TIMEOUT)
        assert batcher.stats().cancelled == 1
    assert [r["y"].item() for r in results] == [5.0, 7.0]
    assert model.batches == [[0.0], [2.0, 3.0]]


async def passed(deadline: float) -> None:
    """Wait until `deadline` (time.monotonic()) has passed."""
    while time.monotonic() <= deadline:
        await asyncio.sleep(max(deadline - time.monotonic(), 0.001))


async def taken(batcher: DynamicBatcher) -> None:
    """Wait until the worker took every queued request into the batch it is forming."""
    for _ in range(1000):
        if batcher.stats().queued == 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the worker never took the queued requests")


# Dropped where the batch is taken from the queue, a dead request leaves its place to a live
# one: with max_batch_size 2, the two live requests behind it run together, not one by one.


@pytest.mark.asyncio
async def test_a_request_expired_in_the_queue_takes_no_place_in_the_next_batch() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=2) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        deadline = time.monotonic() + 0.02
        doomed = submit(batcher, row(1.0), deadline=deadline)
        live = [submit(batcher, row(v)) for v in (2.0, 3.0)]
        await queued(batcher, 3)
        await passed(deadline)  # while the worker is busy with the first batch
        model.open()
        with pytest.raises(DeadlineExceededError, match="deadline passed before"):
            await asyncio.wait_for(doomed, TIMEOUT)
        results = await asyncio.wait_for(asyncio.gather(first, *live), TIMEOUT)
        stats = batcher.stats()
    assert [r["y"].item() for r in results] == [1.0, 5.0, 7.0]
    assert model.batches == [[0.0], [2.0, 3.0]]
    assert (stats.success, stats.fail) == (3, 1)


@pytest.mark.asyncio
async def test_a_request_cancelled_in_the_queue_takes_no_place_in_the_next_batch() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=2) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        gone = submit(batcher, row(1.0))
        live = [submit(batcher, row(v)) for v in (2.0, 3.0)]
        await queued(batcher, 3)
        gone.cancel()  # the caller goes away while its request waits in the queue
        model.open()
        results = await asyncio.wait_for(asyncio.gather(first, *live), TIMEOUT)
        assert batcher.stats().cancelled == 1
    assert [r["y"].item() for r in results] == [1.0, 5.0, 7.0]
    assert model.batches == [[0.0], [2.0, 3.0]]


@pytest.mark.asyncio
async def test_a_request_that_expires_while_its_batch_waits_for_more_is_not_computed() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8, max_queue_delay_s=10.0) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        deadline = time.monotonic() + 0.5
        doomed = submit(batcher, row(1.0), deadline=deadline)
        kept = submit(batcher, row(2.0))
        await queued(batcher, 2)
        model.open()
        await asyncio.wait_for(first, TIMEOUT)
        await taken(batcher)  # the worker holds [1, 2] under load: its window is open
        assert time.monotonic() < deadline, "too slow: the deadline passed before the window"
        # The window closes at the earliest deadline in it (not after 10 s); the expired
        # request is dropped then, and the other runs alone.
        with pytest.raises(DeadlineExceededError, match="deadline passed before"):
            await asyncio.wait_for(doomed, TIMEOUT)
        assert (await asyncio.wait_for(kept, TIMEOUT))["y"].item() == 5.0
        stats = batcher.stats()
    assert model.batches == [[0.0], [2.0]]
    assert (stats.success, stats.fail) == (2, 1)


@pytest.mark.asyncio
async def test_compute_exception_reaches_every_request_of_the_batch() -> None:
    model = GatedModel(model=lambda x: (_ for _ in ()).throw(RuntimeError("boom")))
    async with running(model, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        batch = [submit(batcher, row(v)) for v in (1.0, 2.0, 3.0)]
        await queued(batcher, 3)
        model.open()
        results = await asyncio.wait_for(
            asyncio.gather(first, *batch, return_exceptions=True), TIMEOUT
        )
        stats = batcher.stats()
        # The worker survives a failing model.
        model.model = linear()
        assert (await asyncio.wait_for(ask(batcher, row(4.0)), TIMEOUT))["y"].item() == 9.0
    assert [str(r) for r in results] == ["boom"] * 4
    assert stats.batch_sizes == {} and (stats.fail, stats.success) == (4, 0)


@pytest.mark.asyncio
async def test_stop_fails_queued_requests_and_finishes_the_running_batch() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=1) as batcher:
        model.hold()
        first = submit(batcher, row(4.0))
        await model.wait_entered()
        waiting = [submit(batcher, row(v)) for v in (1.0, 2.0)]
        await queued(batcher, 2)
        stopping = asyncio.create_task(batcher.stop())
        for task in waiting:
            with pytest.raises(ModelNotReadyError) as err:
                await asyncio.wait_for(task, TIMEOUT)
            assert str(err.value) == "model 'm' was stopped"
        model.open()
        assert (await asyncio.wait_for(first, TIMEOUT))["y"].item() == 9.0
        await asyncio.wait_for(stopping, TIMEOUT)
        with pytest.raises(ModelNotReadyError, match="not accepting requests"):
            await ask(batcher, row(1.0))
    assert model.batches == [[4.0]]


@pytest.mark.asyncio
async def test_stop_with_drain_finishes_queued_requests() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        waiting = [submit(batcher, row(v)) for v in (1.0, 2.0)]
        await queued(batcher, 2)
        stopping = asyncio.create_task(batcher.stop(drain=True))
        model.open()
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), TIMEOUT)
        await asyncio.wait_for(stopping, TIMEOUT)
    assert [r["y"].item() for r in results] == [1.0, 3.0, 5.0]


@pytest.mark.asyncio
async def test_priority_lower_number_runs_first() -> None:
    model = GatedModel()
    options = {"max_batch_size": 1, "default_priority_level": 2}
    async with running(model, **options) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        # Value = expected position; priority 0 means the default level, 2.
        tasks = [
            submit(batcher, row(4.0), priority=3),
            submit(batcher, row(2.0), priority=0),
            submit(batcher, row(1.0), priority=1),
            submit(batcher, row(3.0), priority=2),
        ]
        await queued(batcher, 4)
        model.open()
        await asyncio.wait_for(asyncio.gather(first, *tasks), TIMEOUT)
    assert model.batches == [[0.0], [1.0], [2.0], [3.0], [4.0]]


def test_invalid_configuration_is_refused() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
            DynamicBatcher("m", GatedModel(), executor, max_batch_size=0)
        with pytest.raises(ValueError, match="preferred_batch_sizes"):
            DynamicBatcher("m", GatedModel(), executor, max_batch_size=4, preferred_batch_sizes=[8])


# ---------------------------------------------------- collating and splitting, through submit


@pytest.mark.asyncio
async def test_a_batch_concatenates_its_requests_along_dimension_zero() -> None:
    seen: list[dict[str, torch.Tensor]] = []
    gate = GatedModel()

    def compute(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(inputs)
        gate({"x": inputs["x"]})
        return {"y": inputs["x"] * 2, "n": inputs["m"].sum(dim=1, keepdim=True)}

    a = {"x": torch.tensor([[1.0]]), "m": torch.tensor([[True, False]])}
    b = {"x": torch.tensor([[2.0], [3.0]]), "m": torch.tensor([[False, False], [True, True]])}
    async with running(compute, max_batch_size=8) as batcher:
        gate.hold()
        first = submit(batcher, {"x": torch.tensor([[0.0]]), "m": torch.tensor([[True, True]])})
        await gate.wait_entered()
        tasks = [submit(batcher, a), submit(batcher, b)]
        await queued(batcher, 2)
        gate.open()
        _, for_a, for_b = await asyncio.wait_for(asyncio.gather(first, *tasks), TIMEOUT)
    assert seen[1]["x"].tolist() == [[1.0], [2.0], [3.0]]
    assert seen[1]["m"].tolist() == [[True, False], [False, False], [True, True]]
    assert for_a["y"].tolist() == [[2.0]] and for_a["n"].tolist() == [[1]]
    assert for_b["y"].tolist() == [[4.0], [6.0]] and for_b["n"].tolist() == [[0], [2]]


@pytest.mark.asyncio
async def test_a_lone_request_reaches_the_model_without_a_copy() -> None:
    seen: list[torch.Tensor] = []

    def compute(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(inputs["x"])
        return {"y": inputs["x"]}

    x = torch.ones(3, 4)
    async with running(compute) as batcher:
        result = await asyncio.wait_for(ask(batcher, {"x": x}), TIMEOUT)
    assert seen[0] is x and result["y"] is x


@pytest.mark.asyncio
async def test_requests_of_several_rows_get_their_own_rows_back() -> None:
    model = GatedModel(model=lambda x: x)
    async with running(model, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, row(0.0))
        await model.wait_entered()
        requests = [{"x": torch.randn(n, 1)} for n in (1, 4, 2)]
        tasks = [submit(batcher, inputs) for inputs in requests]
        await queued(batcher, 3)
        model.open()
        results = await asyncio.wait_for(asyncio.gather(first, *tasks), TIMEOUT)
    assert len(model.batches) == 2 and len(model.batches[1]) == 7  # one batch of 7 rows
    for original, part in zip(requests, results[1:], strict=True):
        assert torch.equal(original["x"], part["y"])


def test_split_returns_views_per_request() -> None:
    y = torch.arange(6.0).reshape(3, 2)
    parts = split({"y": y}, [1, 2])
    assert [p["y"].tolist() for p in parts] == [[[0.0, 1.0]], [[2.0, 3.0], [4.0, 5.0]]]
    assert parts[1]["y"].data_ptr() == y[1:].data_ptr()


def test_split_of_one_request_passes_through() -> None:
    y = torch.ones(2, 1)
    (only,) = split({"y": y}, [2])
    assert only["y"] is y


# -- histograms and the per-version ledger behind /metrics ------------------------------------

LE_25MS = DURATION_BUCKETS_S.index(0.025)


def test_a_duration_on_a_bucket_bound_counts_in_that_bucket() -> None:
    assert duration_bucket(0) == 0
    assert duration_bucket(100_000) == 0  # exactly 100 us: le="0.0001"
    assert duration_bucket(100_001) == 1
    assert duration_bucket(10**12) == len(DURATION_BUCKETS_S)  # past the last bound: +Inf only


@pytest.mark.asyncio
async def test_queue_compute_and_request_durations_land_in_their_buckets() -> None:
    model = GatedModel()
    async with running(model, max_batch_size=8) as batcher:
        model.hold()
        first = submit(batcher, row(1.0))
        await model.wait_entered()
        second = submit(batcher, row(2.0))
        await queued(batcher, 1)
        await asyncio.sleep(0.03)  # the first forward pass takes at least 30 ms
        model.open()
        await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)
        stats = batcher.stats()
    # Both requests took >= 30 ms from queue to answer; the second waited >= 30 ms queued.
    assert sum(stats.request_buckets) == stats.success == 2
    assert sum(stats.request_buckets[: LE_25MS + 1]) == 0
    assert sum(stats.queue_buckets) == 2 and sum(stats.queue_buckets[LE_25MS + 1 :]) >= 1
    assert sum(stats.compute_buckets) == stats.batches == 2
    assert sum(stats.compute_buckets[LE_25MS + 1 :]) >= 1


async def served_by(ledger: StatsLedger[str], key: str, requests: int) -> DynamicBatcher:
    """A batcher tracked under `key` that answers `requests` requests, then stops."""
    async with running(GatedModel()) as batcher:
        ledger.track(key, batcher)
        for value in range(requests):
            await asyncio.wait_for(ask(batcher, row(float(value))), TIMEOUT)
        assert ledger.totals()[key].success >= requests
    return batcher


@pytest.mark.asyncio
async def test_the_ledger_keeps_a_stopped_batchers_counts_and_adds_its_successors() -> None:
    ledger: StatsLedger[str] = StatsLedger()
    first = await served_by(ledger, "m:1", 2)
    ledger.retire("m:1", first)
    assert ledger.totals()["m:1"].success == 2  # outlives its batcher
    second = await served_by(ledger, "m:1", 1)
    totals = ledger.totals()["m:1"]
    assert (totals.success, totals.rows, totals.batch_sizes) == (3, 3, {1: 3})
    assert sum(totals.request_buckets) == sum(totals.compute_buckets) == 3
    ledger.retire("m:1", second)
    ledger.retire("m:1", second)  # an unload racing an eviction retires it twice
    assert ledger.totals()["m:1"].success == 3  # retired once each, never counted twice


@pytest.mark.asyncio
async def test_the_ledger_forgets_the_oldest_stopped_keys_but_never_a_running_one() -> None:
    ledger: StatsLedger[str] = StatsLedger(keep=1)
    old = await served_by(ledger, "old", 1)
    again = await served_by(ledger, "again", 1)
    ledger.retire("again", again)
    ledger.track("again", again)  # "again" runs once more: its past must stay
    ledger.retire("old", old)
    assert set(ledger.totals()) == {"old", "again"}
    newest = await served_by(ledger, "new", 1)
    ledger.retire("new", newest)
    assert set(ledger.totals()) == {"again", "new"}  # "old" went; "again" is still running
