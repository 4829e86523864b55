"""The job queue's and the aliases' concurrency guarantees, with the interleavings forced
(a transaction held open at its commit, the other one's lock wait observed) rather than
hoped for; and leases on the database's clock. SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import torch

from moduleserve.registry import jobs as jobs_module
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.errors import AliasConflictError
from moduleserve.registry.jobspec import JobSpec
from moduleserve.registry.orm import JobRow, utcnow

KWARGS = {"in_features": 4, "hidden": [8], "out_features": 3, "dropout": 0.0}
WAIT_S = 60  # how long a step may take before the test calls it stuck
LOCK_WAIT_S = 10  # how long a PostgreSQL statement may wait for a row lock, then fails


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


def queue(registry: Registry) -> str:
    base = registry.checkpoints.resolve("mlp", "production")
    digest = registry.datasets.get("toy").digest
    return registry.jobs.create(
        base, "toy", digest, JobSpec().to_dict(), alias=None, created_by="test"
    ).id


def expire_lease(registry: Registry, job_id: str) -> None:
    """The job's worker died long ago: its lease ended in 2000 by any clock."""
    with registry.db.write() as session:
        session.execute(
            sa.update(JobRow)
            .where(JobRow.id == job_id)
            .values(lease_until=datetime(2000, 1, 1, tzinfo=UTC))
        )


@contextmanager
def another_process(registry: Registry, name: str) -> Iterator[Registry]:
    """A second registry client with its own connections, as another worker or admin has;
    on PostgreSQL its sessions carry `name` and give up a lock wait after LOCK_WAIT_S."""
    other = Registry(registry.settings)
    if not other.db.is_sqlite:

        @sa.event.listens_for(other.db.engine, "connect")
        def _label(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cursor:
                cursor.execute(f"SET application_name = '{name}'")
                cursor.execute(f"SET lock_timeout = '{LOCK_WAIT_S}s'")
            dbapi_conn.commit()  # session settings, not undone by the pool's rollback

    try:
        yield other
    finally:
        other.close()


@contextmanager
def held_at_commit(registry: Registry) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Every transaction of `registry` stops just before its COMMIT (its locks held) until
    the second event is set; the first is set once one has stopped there."""
    paused, release = threading.Event(), threading.Event()

    def hold(_conn: sa.Connection) -> None:
        paused.set()
        assert release.wait(WAIT_S), "the test never let the transaction commit"

    sa.event.listen(registry.db.engine, "commit", hold)
    try:
        yield paused, release
    finally:
        release.set()
        sa.event.remove(registry.db.engine, "commit", hold)


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run `target` in a thread; its result or exception lands in the returned dict."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except Exception as exc:  # recorded for the test to assert on
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_until_waiting_for_a_lock(registry: Registry, name: str) -> None:
    """Block until the PostgreSQL session named `name` waits for a row lock."""
    deadline = time.monotonic() + WAIT_S
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name "
        "AND wait_event_type = 'Lock' AND datname = current_database()"
    )
    while True:
        with registry.db.engine.connect() as conn:
            if conn.execute(query, {"name": name}).scalar_one():
                return
        assert time.monotonic() < deadline, f"{name} never waited for a lock"
        time.sleep(0.01)  # polling a condition, not timing anything


def test_a_claim_takes_the_next_job_while_another_claim_holds_the_first(
    seeded: Registry,
) -> None:
    """Without SKIP LOCKED the second claim waits for the first one's row (then times out);
    without FOR UPDATE it takes the same job."""
    if seeded.db.is_sqlite:
        pytest.skip("SQLite serialises claims with its write lock: no claim runs beside another")
    first, second = queue(seeded), queue(seeded)
    with (
        another_process(seeded, "w1") as w1,
        another_process(seeded, "w2") as w2,
        held_at_commit(w1) as (paused, release),
    ):
        thread, claimed = in_thread(lambda: w1.jobs.claim("w1", 30, 3))
        assert paused.wait(WAIT_S)  # w1 holds its claim of the oldest job, uncommitted

        taken = w2.jobs.claim("w2", 30, 3)

        release.set()
        thread.join(WAIT_S)
    assert taken is not None and taken.id == second
    result = claimed["result"]
    assert getattr(result, "id", None) == first
    assert {seeded.jobs.get(j).worker for j in (first, second)} == {"w1", "w2"}


def test_racing_moves_of_an_existing_alias_give_one_winner(seeded: Registry) -> None:
    """Two movers both expect staging at 1, moving it to 2 and to 3. The first is held
    before its commit; on PostgreSQL the second is let go on only once it waits for the
    alias's row lock. Without FOR UPDATE it read the old row and both moves succeed."""
    weights = seeded.state_dict(seeded.checkpoints.resolve("mlp", "1"))
    for _ in range(2):
        seeded.push("mlp", weights)
    seeded.checkpoints.set_alias("mlp", "staging", 1)
    with another_process(seeded, "mover1") as one, another_process(seeded, "mover2") as two:
        with held_at_commit(one) as (paused, release):
            first, moved_first = in_thread(
                lambda: one.checkpoints.set_alias("mlp", "staging", 2, expect=1, actor="one")
            )
            assert paused.wait(WAIT_S)
            second, moved_second = in_thread(
                lambda: two.checkpoints.set_alias("mlp", "staging", 3, expect=1, actor="two")
            )
            if not seeded.db.is_sqlite:  # SQLite: it waits for the write lock, unobservably
                wait_until_waiting_for_a_lock(seeded, "mover2")
            release.set()
            first.join(WAIT_S)
        second.join(WAIT_S)

    assert "error" not in moved_first, moved_first
    error = moved_second.get("error")
    assert isinstance(error, AliasConflictError), moved_second
    assert str(error) == (
        "alias mlp:staging points at version 2, not the expected version 1; nothing was changed"
    )
    assert seeded.checkpoints.resolve("mlp", "staging").version == 2
    history = seeded.checkpoints.alias_history("mlp", "staging")
    assert [(e.from_version, e.to_version, e.actor) for e in history[1:]] == [(1, 2, "one")]


def test_a_cancel_asked_before_the_lease_expired_is_honoured_by_the_next_claim(
    seeded: Registry,
) -> None:
    job_id = queue(seeded)
    assert seeded.jobs.claim("w1", 30, 3) is not None
    assert seeded.jobs.request_cancel(job_id, "alice").state == "running"  # only asked
    expire_lease(seeded, job_id)  # w1 died before it saw the request

    assert seeded.jobs.claim("w2", 30, 3) is None

    job = seeded.jobs.get(job_id)
    assert (job.state, job.reason, job.attempts) == ("cancelled", "cancelled on request", 1)
    assert seeded.jobs.events(job_id)[-1].data["state"] == "cancelled"


def skew(monkeypatch: pytest.MonkeyPatch, offset: timedelta) -> None:
    """This process's idea of now (the clock the registry's Python code reads) runs
    `offset` off the database's: a worker on a machine whose clock is wrong."""
    monkeypatch.setattr(jobs_module, "utcnow", lambda: utcnow() + offset)


def test_leases_are_set_renewed_and_expired_on_the_database_clock(
    seeded: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Computed from the worker's clock, a fast clock steals a live job and cancels it as
    dead, and a slow clock's fresh lease is already over for everyone else."""
    honest = queue(seeded)
    assert seeded.jobs.claim("honest", 60, 3) is not None

    skew(monkeypatch, timedelta(hours=1))
    assert seeded.jobs.claim("fast", 60, 3) is None
    assert seeded.jobs.request_cancel(honest, "fast admin").state == "running"

    slow_job = queue(seeded)
    skew(monkeypatch, timedelta(hours=-1))
    taken = seeded.jobs.claim("slow", 60, 3)
    assert taken is not None and taken.id == slow_job
    assert seeded.jobs.renew(slow_job, "slow", 60).held
    monkeypatch.undo()
    assert seeded.jobs.claim("another", 60, 3) is None
    assert seeded.jobs.get(slow_job).worker == "slow"

    expire_lease(seeded, slow_job)  # and a lease that did end is over for every clock
    skew(monkeypatch, timedelta(hours=-1))
    again = seeded.jobs.claim("slow2", 60, 3)
    assert again is not None and (again.id, again.attempts) == (slow_job, 2)
