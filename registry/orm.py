"""The registry's tables as SQLAlchemy 2 typed ORM rows (never returned to callers)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

# Named constraints: SQLite's batch migrations need names to alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Stores UTC; always hands back aware datetimes (SQLite forgets the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class db_now(FunctionElement[datetime]):  # lower case: it reads as the SQL function it is
    """The database's clock in UTC, plus `seconds`: job leases are set, renewed and expired
    on it, so workers whose own clocks disagree still agree on when a lease ends."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(sa.literal(float(seconds), sa.Float()))


@compiles(db_now)
def _db_now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # now() is the transaction's start: one claim or renewal sees one instant throughout.
    return f"(now() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite's 'now' is UTC. The text matches how SQLAlchemy stores a DateTime there
    # (microseconds: %f gives milliseconds, padded), so comparisons stay chronological.
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', ({seconds}) || ' seconds') || '000')"


class Base(DeclarativeBase):
    """Declarative base with the naming convention and shared column types."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType, datetime: UTCDateTime}


class ModuleClassRow(Base):
    """A registered nn.Module class: import path, constructor kwargs, input spec."""

    __tablename__ = "module_classes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    import_path: Mapped[str] = mapped_column(sa.String(512))
    kwargs: Mapped[dict[str, Any]]
    inputs: Mapped[list[Any]]
    outputs: Mapped[list[Any]]
    description: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelRow(Base):
    """A named model: one class, many versions. `last_version` only ever grows."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    class_id: Mapped[int | None] = mapped_column(sa.ForeignKey("module_classes.id"))
    """None once its class was deleted (only a model with no versions left allows that);
    its next push names a class. The row stays so that version numbers are never reused."""
    last_version: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class VersionRow(Base):
    """One checkpoint version of a model, pointing at a safetensors blob."""

    __tablename__ = "versions"
    __table_args__ = (sa.UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int]
    digest: Mapped[str] = mapped_column(sa.String(64), index=True)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    parent_version: Mapped[int | None]
    source: Mapped[str] = mapped_column(sa.String(128))
    description: Mapped[str] = mapped_column(sa.Text, default="")
    tags: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasRow(Base):
    """A movable name (`production`, `staging`) for one version of a model."""

    __tablename__ = "aliases"
    __table_args__ = (sa.UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(64))
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("versions.id", ondelete="RESTRICT"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasEventRow(Base):
    """One alias move (from, to, when, by whom): the alias history."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(sa.String(64))
    from_version: Mapped[int | None]
    to_version: Mapped[int | None]
    actor: Mapped[str] = mapped_column(sa.String(128))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetRow(Base):
    """A named set of tensors (inputs, targets) for fine-tuning, stored as a blob."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    digest: Mapped[str] = mapped_column(sa.String(64), index=True)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    tensors: Mapped[dict[str, Any]]
    description: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    """A fine-tuning job: base version, dataset (pinned by digest), hyperparameters, state."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"))
    base_version: Mapped[int]
    dataset: Mapped[str] = mapped_column(sa.String(128))
    dataset_digest: Mapped[str] = mapped_column(sa.String(64), index=True)
    spec: Mapped[dict[str, Any]]
    alias: Mapped[str | None] = mapped_column(sa.String(64))
    alias_expect: Mapped[int | None]
    """The version `alias` pointed at when the job was created: the compare-and-set value."""
    alias_moved: Mapped[bool] = mapped_column(default=False)
    state: Mapped[str] = mapped_column(sa.String(16), index=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    attempts: Mapped[int] = mapped_column(default=0)
    lost_leases: Mapped[int] = mapped_column(default=0)
    """How often a worker died holding the job (a graceful hand-back does not count)."""
    worker: Mapped[str] = mapped_column(sa.String(128), default="")
    lease_until: Mapped[datetime | None]
    result_version: Mapped[int | None]
    metrics: Mapped[dict[str, Any]]
    best_epoch: Mapped[int] = mapped_column(default=0)
    last_seq: Mapped[int] = mapped_column(default=0)
    """The newest event's number; only ever grows (events are numbered 1, 2, 3… per job)."""
    created_by: Mapped[str] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEventRow(Base):
    """One stored job event (state change, progress, epoch end, log line), in order."""

    __tablename__ = "job_events"
    __table_args__ = (sa.UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16))
    data: Mapped[dict[str, Any]]
    at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEpochRow(Base):
    """What one epoch of a job left: losses, its weights and the state to resume after it."""

    __tablename__ = "job_epochs"
    __table_args__ = (sa.UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    train_loss: Mapped[float]
    val_loss: Mapped[float | None]
    digest: Mapped[str] = mapped_column(sa.String(64), index=True)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    resume_digest: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    """Optimizer and RNG state to resume after this epoch; kept for the newest epoch of a
    running job only (it is about twice the weights' size with Adam)."""
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
