"""Fine-tuning jobs: the queue, leases, events and results, as one repository over three tables.

Workers claim queued jobs (and running jobs whose lease expired) in one write transaction:
`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL, so several workers on several machines
each take a different job; SQLite's `BEGIN IMMEDIATE` serialises claimers instead. A
worker renews its lease while it trains; a job whose worker died is claimed again once
the lease has expired, and resumes from its last epoch. Every write by a worker checks
that the worker still holds the job, so a worker that lost its lease changes nothing.

Leases are set, renewed and expired on the database's clock (`db_now`), never on a
worker's: workers on machines whose clocks disagree still agree on when a lease ends.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from moduleserve.registry.checkpoints import Checkpoints
from moduleserve.registry.db import Database
from moduleserve.registry.entities import (
    FINISHED_JOB_STATES,
    JOB_STATES,
    Job,
    JobEpoch,
    JobEvent,
    Version,
)
from moduleserve.registry.errors import InvalidInputError, JobNotFoundError, JobStateError
from moduleserve.registry.orm import JobEpochRow, JobEventRow, JobRow, ModelRow, db_now, utcnow

MAX_JOB_ID_LENGTH = 32
MAX_REASON_LENGTH = 2000


@dataclass(frozen=True)
class Lease:
    """What a worker learns when it renews its lease."""

    held: bool
    """False once another worker took the job or it was finished: stop, change nothing."""
    cancel_requested: bool


@dataclass(frozen=True)
class JobResult:
    """A finished job's new checkpoint (its blob already stored) and what to record on it."""

    digest: str
    size: int
    class_name: str
    metrics: dict[str, Any]
    best_epoch: int
    description: str


class Jobs:
    """Fine-tuning jobs and their events and epochs."""

    def __init__(self, db: Database, checkpoints: Checkpoints) -> None:
        self._db = db
        self._checkpoints = checkpoints

    # -- creating and reading --------------------------------------------------------------

    def create(
        self,
        base: Version,
        dataset: str,
        dataset_digest: str,
        spec: Mapping[str, Any],
        *,
        alias: str | None,
        created_by: str,
        notes: Sequence[str] = (),
    ) -> Job:
        """Queue a job (its inputs already validated); the alias's current version is kept as
        the compare-and-set value for moving it on success. Each of `notes` (what validation
        adjusted) becomes a log event after the queued one."""
        expect = self._checkpoints.alias_version(base.model, alias) if alias else None
        with self._db.write() as session:
            model_row = _model_row(session, base.model)
            row = JobRow(
                id=uuid.uuid4().hex[:12],
                model_id=model_row.id,
                base_version=base.version,
                dataset=dataset,
                dataset_digest=dataset_digest,
                spec=dict(spec),
                alias=alias,
                alias_expect=expect,
                alias_moved=False,
                state="queued",
                cancel_requested=False,
                reason="",
                attempts=0,
                lost_leases=0,
                worker="",
                metrics={},
                best_epoch=0,
                last_seq=0,
                created_by=created_by,
                created_at=utcnow(),
            )
            session.add(row)
            session.flush()
            _add_event(session, row, "state", {"state": "queued", "message": f"by {created_by}"})
            for note in notes:
                _add_event(session, row, "log", {"message": note})
            return _job(session, row)

    def get(self, job_id: str) -> Job:
        """One job with its epochs and latest progress."""
        with self._db.read() as session:
            return _job(session, _job_row(session, job_id))

    def list(
        self, model: str | None = None, states: Sequence[str] = (), limit: int = 100
    ) -> builtins.list[Job]:
        """Jobs, newest first."""
        for state in states:
            _check_state(state)
        with self._db.read() as session:
            query = sa.select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id).limit(limit)
            if model:
                query = query.join(ModelRow, ModelRow.id == JobRow.model_id).where(
                    ModelRow.name == model
                )
            if states:
                query = query.where(JobRow.state.in_(list(states)))
            return _jobs(session, list(session.scalars(query)))

    def events(self, job_id: str, after_seq: int = 0, limit: int = 0) -> builtins.list[JobEvent]:
        """The job's events with seq > after_seq, oldest first (all when limit is 0)."""
        with self._db.read() as session:
            _job_row(session, job_id)
            query = (
                sa.select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.seq > after_seq)
                .order_by(JobEventRow.seq)
            )
            if limit > 0:
                query = query.limit(limit)
            return [_event(row) for row in session.scalars(query)]

    def poll(self, job_id: str, after_seq: int) -> tuple[builtins.list[JobEvent], bool]:
        """The events after `after_seq` and whether the job has finished, in one read: when
        it says finished, the events include the last one (the state is read first)."""
        with self._db.read() as session:
            state = session.scalar(sa.select(JobRow.state).where(JobRow.id == job_id))
            if state is None:
                raise JobNotFoundError(job_id)
            rows = session.scalars(
                sa.select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.seq > after_seq)
                .order_by(JobEventRow.seq)
            )
            return [_event(row) for row in rows], state in FINISHED_JOB_STATES

    def epoch(self, job_id: str, epoch: int) -> JobEpoch:
        """One kept epoch of a job."""
        job = self.get(job_id)
        for kept in job.epochs:
            if kept.epoch == epoch:
                return kept
        kept_text = ", ".join(str(e.epoch) for e in job.epochs) or "none"
        raise JobStateError(f"job {job_id} kept no checkpoint of epoch {epoch} (kept: {kept_text})")

    def referenced_digests(self) -> dict[str, builtins.list[str]]:
        """Digest → the jobs that need it (datasets, epoch weights, resume state)."""
        result: dict[str, list[str]] = {}
        with self._db.read() as session:
            for digest, job_id in session.execute(sa.select(JobRow.dataset_digest, JobRow.id)):
                result.setdefault(digest, []).append(f"job {job_id} dataset")
            rows = session.execute(
                sa.select(JobEpochRow.digest, JobEpochRow.resume_digest, JobEpochRow.job_id)
            )
            for digest, resume_digest, job_id in rows:
                result.setdefault(digest, []).append(f"job {job_id} epoch")
                if resume_digest:
                    result.setdefault(resume_digest, []).append(f"job {job_id} resume state")
        return result

    # -- cancelling ------------------------------------------------------------------------

    def request_cancel(self, job_id: str, actor: str) -> Job:
        """Cancel a queued job, or one whose worker died, now; ask a running one's worker to
        stop (it looks twice a second and registers nothing)."""
        with self._db.write() as session:
            row = _job_row(session, job_id, lock=True)
            if row.state in FINISHED_JOB_STATES:
                raise JobStateError(f"job {job_id} already {row.state}; there is nothing to cancel")
            if row.state == "queued":
                _set_state(session, row, "cancelled", f"cancelled by {actor} before it started")
            elif _lease_expired(row, _db_time(session)):
                _set_state(session, row, "cancelled", f"cancelled by {actor} (no live worker)")
            elif not row.cancel_requested:
                row.cancel_requested = True
                _add_event(session, row, "log", {"message": f"cancel requested by {actor}"})
            return _job(session, row)

    # -- the worker's side -----------------------------------------------------------------

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> Job | None:
        """Take the oldest queued job, or a running one whose lease expired; None if none.

        A job whose workers died `max_attempts` times is failed instead of run once more,
        and one whose cancel was asked is cancelled instead of run.
        """
        with self._db.write() as session:
            now = _db_time(session)
            while True:
                row = session.scalar(
                    sa.select(JobRow)
                    .where(
                        (JobRow.state == "queued")
                        | ((JobRow.state == "running") & (JobRow.lease_until < now))
                    )
                    .order_by(JobRow.created_at, JobRow.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if row is None:
                    return None
                if row.state == "running":
                    row.lost_leases += 1
                if row.cancel_requested:
                    _set_state(session, row, "cancelled", "cancelled on request")
                elif row.lost_leases >= max_attempts:
                    _set_state(
                        session,
                        row,
                        "failed",
                        f"its worker stopped renewing its lease {row.lost_leases} times "
                        f"(last: {row.worker}); not retried again",
                    )
                else:
                    return _take(session, row, worker, now + timedelta(seconds=lease_s))

    def renew(self, job_id: str, worker: str, lease_s: float) -> Lease:
        """Extend the lease; says whether the worker still holds the job and if cancel was asked."""
        with self._db.write() as session:
            held = session.execute(
                sa.update(JobRow)
                .where(JobRow.id == job_id, JobRow.worker == worker, JobRow.state == "running")
                .values(lease_until=db_now(lease_s))
                .returning(JobRow.cancel_requested)
            ).scalar_one_or_none()
        return Lease(held=held is not None, cancel_requested=bool(held))

    def add_event(self, job_id: str, worker: str, kind: str, data: Mapping[str, Any]) -> bool:
        """Record a progress or log event; False (nothing written) if the worker lost the job."""
        with self._db.write() as session:
            row = _held_row(session, job_id, worker)
            if row is None:
                return False
            _add_event(session, row, kind, dict(data))
            return True

    def record_epoch(
        self,
        job_id: str,
        worker: str,
        epoch: JobEpoch,
        is_best: bool,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Keep an epoch's checkpoint and resume state (blobs already stored) and its event
        (with `details` such as the step count added to it)."""
        with self._db.write() as session:
            row = _held_row(session, job_id, worker)
            if row is None:
                return False
            session.execute(
                sa.delete(JobEpochRow).where(
                    JobEpochRow.job_id == job_id, JobEpochRow.epoch == epoch.epoch
                )
            )
            _drop_resume_states(session, job_id)  # only the newest epoch's is ever resumed
            session.add(
                JobEpochRow(
                    job_id=job_id,
                    epoch=epoch.epoch,
                    train_loss=epoch.train_loss,
                    val_loss=epoch.val_loss,
                    digest=epoch.digest,
                    size=epoch.size,
                    resume_digest=epoch.resume_digest,
                    finished_at=epoch.finished_at,
                )
            )
            if is_best:
                row.best_epoch = epoch.epoch
            data = {
                **(details or {}),
                "epoch": epoch.epoch,
                "loss": epoch.train_loss,
                "val_loss": epoch.val_loss,
            }
            _add_event(session, row, "epoch", data)
            return True

    def succeed(self, job_id: str, worker: str, result: JobResult) -> Job | None:
        """Register the result version, move the alias (compare-and-set) and finish the job,
        all in one transaction. A cancel that arrived meanwhile wins: the job ends cancelled
        and nothing is registered. None (nothing written) if the worker lost the job."""
        with self._db.write() as session:
            row = _held_row(session, job_id, worker)
            if row is None:
                return None
            if row.cancel_requested:
                _set_state(session, row, "cancelled", "cancelled on request")
                return _job(session, row)
            model = session.get_one(ModelRow, row.model_id).name
            version = self._checkpoints.add_version_in(
                session,
                model,
                result.class_name,
                digest=result.digest,
                size=result.size,
                parent=row.base_version,
                source=f"job {job_id}",
                description=result.description,
                tags={"dataset": row.dataset},
                metrics={**result.metrics, "hyperparameters": row.spec},
                alias=None,
                actor=f"job {job_id}",
            )
            row.result_version, row.metrics = version.version, dict(result.metrics)
            row.best_epoch = result.best_epoch or row.best_epoch
            self._move_alias(session, row, model, version.version)
            _set_state(session, row, "succeeded", f"registered {model}:{version.version}")
            return _job(session, row)

    def _move_alias(self, session: Session, row: JobRow, model: str, version: int) -> None:
        if not row.alias:
            return
        row.alias_moved = self._checkpoints.move_alias_in(
            session, model, row.alias, version, expect=row.alias_expect, actor=f"job {row.id}"
        )
        if row.alias_moved:
            message = f"moved alias {row.alias} to {model}:{version}"
        else:
            message = (
                f"alias {row.alias} was not moved: it no longer points where it did when the "
                "job was created"
            )
        _add_event(session, row, "log", {"message": message})

    def finish(self, job_id: str, worker: str, state: str, reason: str) -> bool:
        """End a job as failed or cancelled; False if the worker lost the job."""
        if state not in ("failed", "cancelled"):
            raise ValueError(f"finish() ends jobs as failed or cancelled, not {state}")
        with self._db.write() as session:
            row = _held_row(session, job_id, worker)
            if row is None:
                return False
            _set_state(session, row, state, reason[:MAX_REASON_LENGTH])
            return True

    def release(self, job_id: str, worker: str, reason: str) -> bool:
        """Hand a running job back to the queue (its worker is shutting down)."""
        with self._db.write() as session:
            row = _held_row(session, job_id, worker)
            if row is None:
                return False
            row.worker, row.lease_until = "", None
            if row.cancel_requested:
                _set_state(session, row, "cancelled", "cancelled on request")
            else:
                _set_state(session, row, "queued", reason)
            return True


def _take(session: Session, row: JobRow, worker: str, lease_until: datetime) -> Job:
    resumed = row.state == "running"
    row.worker, row.lease_until = worker, lease_until
    row.attempts += 1
    row.started_at = row.started_at or utcnow()
    message = f"attempt {row.attempts} on {worker}"
    if resumed:
        message += " (the previous worker's lease expired)"
    _set_state(session, row, "running", message)
    return _job(session, row)


def _held_row(session: Session, job_id: str, worker: str) -> JobRow | None:
    """The job's row, locked, if `worker` still holds it running."""
    row = _job_row(session, job_id, lock=True)
    if row.state != "running" or row.worker != worker:
        return None
    return row


def _lease_expired(row: JobRow, now: datetime) -> bool:
    return row.state == "running" and row.lease_until is not None and row.lease_until < now


def _db_time(session: Session) -> datetime:
    """The database's clock now: what leases are compared with (see `db_now`)."""
    return session.execute(sa.select(db_now())).scalar_one()


def _drop_resume_states(session: Session, job_id: str) -> None:
    session.execute(
        sa.update(JobEpochRow).where(JobEpochRow.job_id == job_id).values(resume_digest=None)
    )


def _set_state(session: Session, row: JobRow, state: str, message: str) -> None:
    row.state = state
    if state in FINISHED_JOB_STATES:
        row.finished_at, row.lease_until = utcnow(), None
        row.reason = message if state != "succeeded" else ""
        _drop_resume_states(session, row.id)  # a finished job is never resumed
    _add_event(session, row, "state", {"state": state, "message": message})


def _add_event(session: Session, row: JobRow, kind: str, data: dict[str, Any]) -> None:
    # The job's row is locked (or SQLite's write lock held), so the numbers stay in order.
    row.last_seq += 1
    data = {**data, "attempt": row.attempts}
    session.add(JobEventRow(job_id=row.id, seq=row.last_seq, kind=kind, data=data, at=utcnow()))
    session.flush()


def _job_row(session: Session, job_id: str, *, lock: bool = False) -> JobRow:
    if not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
        raise InvalidInputError(f"invalid job id {job_id[:40]!r}")
    query = sa.select(JobRow).where(JobRow.id == job_id)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise JobNotFoundError(job_id)
    return row


def _model_row(session: Session, model: str) -> ModelRow:
    return session.scalars(sa.select(ModelRow).where(ModelRow.name == model)).one()


def _check_state(state: str) -> None:
    if state not in JOB_STATES:
        raise InvalidInputError(f"unknown job state {state!r}: use one of {', '.join(JOB_STATES)}")


def _job(session: Session, row: JobRow) -> Job:
    return _jobs(session, [row])[0]


def _jobs(session: Session, rows: Sequence[JobRow]) -> builtins.list[Job]:
    """Rows → entities with their models, epochs and latest progress, in three queries
    however many jobs there are."""
    ids = [row.id for row in rows]
    models: dict[int, str] = {
        model_id: name
        for model_id, name in session.execute(
            sa.select(ModelRow.id, ModelRow.name).where(
                ModelRow.id.in_({row.model_id for row in rows})
            )
        )
    }
    epochs: dict[str, list[JobEpoch]] = {}
    for epoch_row in session.scalars(
        sa.select(JobEpochRow).where(JobEpochRow.job_id.in_(ids)).order_by(JobEpochRow.epoch)
    ):
        epochs.setdefault(epoch_row.job_id, []).append(_epoch(epoch_row))
    latest = (
        sa.select(JobEventRow.job_id, sa.func.max(JobEventRow.seq).label("seq"))
        .where(JobEventRow.job_id.in_(ids), JobEventRow.kind == "progress")
        .group_by(JobEventRow.job_id)
        .subquery()
    )
    progress = {
        event.job_id: _event(event)
        for event in session.scalars(
            sa.select(JobEventRow).join(
                latest,
                (JobEventRow.job_id == latest.c.job_id) & (JobEventRow.seq == latest.c.seq),
            )
        )
    }
    return [
        _job_entity(row, models[row.model_id], epochs.get(row.id, []), progress.get(row.id))
        for row in rows
    ]


def _job_entity(
    row: JobRow, model: str, epochs: Sequence[JobEpoch], progress: JobEvent | None
) -> Job:
    return Job(
        id=row.id,
        model=model,
        base_version=row.base_version,
        dataset=row.dataset,
        dataset_digest=row.dataset_digest,
        spec=dict(row.spec),
        state=row.state,
        alias=row.alias,
        alias_expect=row.alias_expect,
        alias_moved=row.alias_moved,
        cancel_requested=row.cancel_requested,
        reason=row.reason,
        attempts=row.attempts,
        worker=row.worker,
        lease_until=row.lease_until,
        result_version=row.result_version,
        metrics=dict(row.metrics),
        best_epoch=row.best_epoch,
        created_by=row.created_by,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        epochs=tuple(epochs),
        progress=progress,
    )


def _epoch(row: JobEpochRow) -> JobEpoch:
    return JobEpoch(
        epoch=row.epoch,
        train_loss=row.train_loss,
        val_loss=row.val_loss,
        digest=row.digest,
        size=row.size,
        resume_digest=row.resume_digest,
        finished_at=row.finished_at,
    )


def _event(row: JobEventRow) -> JobEvent:
    return JobEvent(job_id=row.job_id, seq=row.seq, kind=row.kind, data=dict(row.data), at=row.at)
