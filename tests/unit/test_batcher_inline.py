"""DynamicBatcher with no executor: batches computed inline on the event loop keep the
batching rules (a lone request at once, batches grow with load, expired requests dropped)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from moduleserve.server.engine.batcher import DynamicBatcher
from moduleserve.server.errors import DeadlineExceededError
from tests.unit.test_batcher import TIMEOUT, ask, row


class Recorder:
    """y = 2x + 1 on the calling thread; records each batch and the thread it ran on."""

    def __init__(self, sleep_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[float]] = []
        self.sleep_s = sleep_s
        self.fail = fail

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.batches.append(inputs["x"].flatten().tolist())
        if self.sleep_s:
            time.sleep(self.sleep_s)  # holds the loop: that is what inline means
        if self.fail:
            raise RuntimeError("model failed")
        return {"y": inputs["x"] * 2 + 1}


@asynccontextmanager
async def inline(compute: Recorder, **options: Any) -> AsyncIterator[DynamicBatcher]:
    batcher = DynamicBatcher("m", compute, None, **options)
    batcher.start()
    try:
        yield batcher
    finally:
        await asyncio.wait_for(batcher.stop(), TIMEOUT)


@pytest.mark.asyncio
async def test_lone_request_runs_at_once_inline() -> None:
    model = Recorder()
    async with inline(model, max_batch_size=8, max_queue_delay_s=10.0) as batcher:
        assert batcher.inline
        result = await asyncio.wait_for(ask(batcher, row(4.0)), TIMEOUT)
        stats = batcher.stats()
    assert result["y"].tolist() == [[9.0]]
    assert model.batches == [[4.0]] and stats.batch_sizes == {1: 1}


@pytest.mark.asyncio
async def test_requests_queued_together_form_one_inline_batch() -> None:
    model = Recorder()
    async with inline(model, max_batch_size=8) as batcher:
        tasks = [asyncio.create_task(ask(batcher, row(v))) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        stats = batcher.stats()
    assert [r["y"].item() for r in results] == [3.0, 5.0, 7.0, 9.0, 11.0]
    assert model.batches == [[1.0, 2.0, 3.0, 4.0, 5.0]]
    assert stats.batch_sizes == {5: 1} and stats.success == 5


@pytest.mark.asyncio
async def test_request_that_expires_behind_an_inline_batch_is_never_computed() -> None:
    model = Recorder(sleep_s=0.2)
    async with inline(model, max_batch_size=1) as batcher:
        first = asyncio.create_task(ask(batcher, row(1.0)))
        late = asyncio.create_task(ask(batcher, row(2.0), deadline=time.monotonic() + 0.05))
        assert (await asyncio.wait_for(first, TIMEOUT))["y"].item() == 3.0
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(late, TIMEOUT)
        stats = batcher.stats()
    assert model.batches == [[1.0]]
    assert (stats.success, stats.fail) == (1, 1)


@pytest.mark.asyncio
async def test_inline_model_failure_fails_its_batch_and_the_batcher_goes_on() -> None:
    model = Recorder(fail=True)
    async with inline(model, max_batch_size=4) as batcher:
        with pytest.raises(RuntimeError, match="model failed"):
            await asyncio.wait_for(ask(batcher, row(1.0)), TIMEOUT)
        model.fail = False
        assert (await asyncio.wait_for(ask(batcher, row(2.0)), TIMEOUT))["y"].item() == 5.0


@pytest.mark.asyncio
async def test_other_tasks_run_between_inline_batches() -> None:
    # Two batches' worth queued at once: the loop gets a turn between them, so a task
    # scheduled meanwhile runs before the second batch starts.
    model = Recorder()
    seen: list[int] = []
    async with inline(model, max_batch_size=1) as batcher:

        async def bystander() -> None:
            seen.append(len(model.batches))

        tasks = [asyncio.create_task(ask(batcher, row(v))) for v in (1.0, 2.0)]
        await asyncio.sleep(0)  # both queued; the worker runs the first batch next
        other = asyncio.create_task(bystander())
        await asyncio.wait_for(asyncio.gather(*tasks, other), TIMEOUT)
    assert seen == [1] and model.batches == [[1.0], [2.0]]
