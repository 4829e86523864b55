"""Listing jobs and versions, and following a job, cost a number of SQL statements that does
not grow with the rows or the watchers (counted on the engine). SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.entities import JobEpoch
from moduleserve.registry.jobspec import JobSpec
from moduleserve.registry.orm import utcnow
from moduleserve.server.jobs.api import JobFeeds

KWARGS = {"in_features": 4, "hidden": [8], "out_features": 3, "dropout": 0.0}
LIST_STATEMENTS = 6  # what a listing may take, however many rows it returns


@pytest.fixture
def seeded(registry: Registry) -> Registry:
    registry.classes.register(
        "MLP", "moduleserve.registry.demo.models:MLP", KWARGS, [parse_input_spec("x:float32:-1,4")]
    )
    module = registry.classes.build(registry.classes.get("MLP"))
    registry.push("mlp", module.state_dict(), class_name="MLP", alias="production")
    registry.push_dataset(
        "toy", {"inputs": torch.randn(16, 4), "targets": torch.randint(0, 3, (16,))}
    )
    return registry


@contextmanager
def statements(registry: Registry) -> Iterator[list[str]]:
    """The SQL statements the registry's engine runs inside the block (BEGIN included)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sa.event.listen(registry.db.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(registry.db.engine, "before_cursor_execute", count)


def queue(registry: Registry) -> str:
    base = registry.checkpoints.resolve("mlp", "production")
    digest = registry.datasets.get("toy").digest
    return registry.jobs.create(
        base, "toy", digest, JobSpec().to_dict(), alias=None, created_by="test"
    ).id


def run_some(registry: Registry, epochs: int) -> str:
    """A running job with `epochs` kept epochs and a progress event after each."""
    job_id = queue(registry)
    claimed = registry.jobs.claim(f"w-{job_id}", 60, 3)
    assert claimed is not None and claimed.id == job_id
    weights = registry.checkpoints.resolve("mlp", "1")
    for epoch in range(1, epochs + 1):
        kept = JobEpoch(epoch, 1.0 / epoch, None, weights.digest, weights.size, None, utcnow())
        registry.jobs.record_epoch(job_id, f"w-{job_id}", kept, is_best=epoch == 1)
        registry.jobs.add_event(job_id, f"w-{job_id}", "progress", {"step": epoch * 10})
    return job_id


def test_listing_jobs_takes_the_same_statements_for_one_job_or_sixty(seeded: Registry) -> None:
    first = run_some(seeded, epochs=2)
    with statements(seeded) as one:
        assert len(seeded.jobs.list()) == 1

    busy = [run_some(seeded, epochs=3) for _ in range(4)]
    idle = [queue(seeded) for _ in range(55)]
    with statements(seeded) as sixty:
        listed = {job.id: job for job in seeded.jobs.list()}

    assert len(listed) == 60
    assert len(sixty) == len(one) <= LIST_STATEMENTS, sixty
    # Each job still gets its own epochs and its latest progress.
    assert [e.epoch for e in listed[first].epochs] == [1, 2]
    assert listed[first].progress is not None and listed[first].progress.data["step"] == 20
    for job_id in busy:
        assert [e.epoch for e in listed[job_id].epochs] == [1, 2, 3]
        assert listed[job_id].progress is not None
        assert listed[job_id].progress.data["step"] == 30
    assert all(listed[j].epochs == () and listed[j].progress is None for j in idle)
    assert {listed[j].model for j in listed} == {"mlp"}


def test_listing_versions_takes_the_same_statements_for_one_version_or_twenty(
    seeded: Registry,
) -> None:
    with statements(seeded) as one:
        assert len(seeded.checkpoints.list_versions("mlp")) == 1

    first = seeded.checkpoints.resolve("mlp", "1")
    for _ in range(19):
        seeded.checkpoints.add_version("mlp", first.digest, first.size, "MLP")
    seeded.checkpoints.set_alias("mlp", "staging", 7)
    seeded.checkpoints.set_alias("mlp", "canary", 7)
    with statements(seeded) as twenty:
        versions = seeded.checkpoints.list_versions("mlp")

    assert [v.version for v in versions] == list(range(1, 21))
    assert len(twenty) == len(one) <= LIST_STATEMENTS, twenty
    aliases = {v.version: v.aliases for v in versions if v.aliases}
    assert aliases == {1: ("production",), 7: ("canary", "staging")}
    assert {v.class_name for v in versions} == {"MLP"}


async def watch(
    feeds: JobFeeds, job_id: str, after_seq: int, started: asyncio.Event
) -> list[tuple[int, str]]:
    """Follow a job to its end: (seq, state) of each event; `started` is set at the first."""
    seen = []
    async for event in feeds.follow(job_id, after_seq):
        seen.append((event.seq, event.data.get("state", "")))
        started.set()
    return seen


async def follow_to_the_end(
    registry: Registry, watchers: int, alone: tuple[int, int, list[Any]] | None = None
) -> tuple[int, int, list[Any]]:
    """`watchers` follow one job; statements of the first poll (which hands every watcher
    the queued event), then of the poll after the job was cancelled. The interval is an
    hour: a poll happens at a watcher's arrival or when woken, never by the clock. With
    `alone` (the figures of one watcher), the first count must match it."""
    job_id = await asyncio.to_thread(queue, registry)
    feeds = JobFeeds(registry, poll_s=3600)
    started = [asyncio.Event() for _ in range(watchers)]
    with statements(registry) as joining:
        tasks = [asyncio.create_task(watch(feeds, job_id, 0, s)) for s in started]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 30)
    if alone is not None:
        assert len(joining) == alone[0], joining
    assert feeds.followed == {job_id}
    await asyncio.to_thread(registry.jobs.request_cancel, job_id, "alice")
    with statements(registry) as ending:
        feeds.wake(job_id)
        seen = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert feeds.followed == set()
    return len(joining), len(ending), seen


async def test_watchers_of_one_job_share_one_poller(seeded: Registry) -> None:
    alone = await follow_to_the_end(seeded, watchers=1)
    crowd = await follow_to_the_end(seeded, watchers=8, alone=alone)

    assert crowd[:2] == alone[:2]  # the statements of one poller, however many watch
    assert alone[2] == [[(1, "queued"), (2, "cancelled")]]
    assert crowd[2] == alone[2] * 8


async def test_a_late_watcher_replays_what_it_missed_and_the_last_one_out_stops_the_poller(
    seeded: Registry,
) -> None:
    job_id = await asyncio.to_thread(queue, seeded)
    feeds = JobFeeds(seeded, poll_s=3600)
    early_seqs: asyncio.Queue[int] = asyncio.Queue()

    async def early_watch() -> list[int]:
        seen = []
        async for event in feeds.follow(job_id):
            seen.append(event.seq)
            early_seqs.put_nowait(event.seq)
        return seen

    early = asyncio.create_task(early_watch())
    assert await asyncio.wait_for(early_seqs.get(), 30) == 1
    await asyncio.to_thread(seeded.jobs.claim, "w1", 60, 3)  # seq 2: running
    feeds.wake(job_id)
    assert await asyncio.wait_for(early_seqs.get(), 30) == 2
    started = asyncio.Event()
    late = asyncio.create_task(watch(feeds, job_id, 0, started))  # after the poller's seq
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.to_thread(seeded.jobs.finish, job_id, "w1", "failed", "broke")  # seq 3
    feeds.wake(job_id)

    assert await asyncio.wait_for(early, 30) == [1, 2, 3]
    assert [seq for seq, _ in await asyncio.wait_for(late, 30)] == [1, 2, 3]
    assert feeds.followed == set()  # the job ended: its poller too

    watchers = [asyncio.create_task(watch(feeds, job_id, 3, asyncio.Event())) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*watchers), 30)  # an ended job: nothing more
    other = await asyncio.to_thread(queue, seeded)
    one, two = (asyncio.create_task(watch(feeds, other, 0, e)) for e in (asyncio.Event(),) * 2)
    await asyncio.sleep(0)  # both start following
    assert feeds.followed == {other}
    one.cancel()
    await asyncio.gather(one, return_exceptions=True)
    assert feeds.followed == {other}  # one watcher left: still polled
    two.cancel()
    await asyncio.gather(two, return_exceptions=True)
    assert feeds.followed == set()  # the last one left: the poller stopped
