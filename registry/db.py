"""Database engine, sessions and schema migrations (SQLite or PostgreSQL)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from moduleserve.registry.errors import (
    RegistryMissingError,
    RegistryUnavailableError,
    SchemaOutdatedError,
    WriteConflictError,
)

logger = logging.getLogger(__name__)

# Any 64-bit constant works; it names the lock all moduleserve processes take to migrate.
MIGRATION_LOCK_KEY = 0x6D6F64756C65


def make_engine(url: str, busy_timeout_ms: int = 30_000) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys on every connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    # No folder is made here: only `migrate` (moduleserve-registry init) creates a registry.
    engine = sa.create_engine(url, connect_args={"check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transactions out of pysqlite's hands so that BEGIN is ours (see _on_begin).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the lock up front (IMMEDIATE): a deferred transaction that reads,
        # then writes, fails at once with SQLITE_BUSY when another writer went first.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class Database:
    """An engine plus the two session factories: read units and write units."""

    def __init__(self, url: str, busy_timeout_ms: int = 30_000) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(writer, expire_on_commit=False)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work."""
        with wrap_db_errors(), self._reads.begin() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A write unit of work: committed when the block ends, rolled back on error."""
        with wrap_db_errors(), self._writes.begin() as session:
            yield session

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    def sqlite_file(self) -> Path | None:
        """The SQLite database file, or None (PostgreSQL, in-memory SQLite)."""
        database = self.engine.url.database
        if not self.is_sqlite or not database or database == ":memory:":
            return None
        return Path(database).resolve()


@contextlib.contextmanager
def wrap_db_errors() -> Iterator[None]:
    """Turn connection trouble and lock time-outs into RegistryUnavailableError, and unique or
    foreign-key violations (a concurrent writer won a race) into WriteConflictError."""
    try:
        yield
    except sa.exc.IntegrityError as exc:
        raise WriteConflictError(
            "a concurrent change to the registry conflicted with this one; nothing was "
            "changed, retry"
        ) from exc
    except sa.exc.OperationalError as exc:
        raise RegistryUnavailableError(
            f"the registry database is unavailable ({exc.orig})"
        ) from exc


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """The Alembic configuration shipped in the package (works from a wheel too)."""
    ini = resources.files("moduleserve.registry") / "alembic.ini"
    config = Config(str(ini))
    config.set_main_option("script_location", "moduleserve.registry:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this release knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations folder has no head"
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(db: Database) -> tuple[str | None, str]:
    """Create or upgrade the schema to head, once, even with several processes at it.

    Returns (revision before, revision after).
    """
    sqlite_file = db.sqlite_file()
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    with _migration_lock(db), db.engine.connect() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(alembic_config(conn), "head")
        conn.commit()
    after = current_revision(db.engine)
    assert after is not None
    if before != after:
        logger.info("registry schema migrated from %s to %s", before or "empty", after)
    return before, after


def check_schema(db: Database) -> None:
    """Refuse to run on a database whose schema is not at this release's head, or on a
    SQLite file that does not exist (without creating it)."""
    sqlite_file = db.sqlite_file()
    if sqlite_file is not None and not sqlite_file.is_file():
        raise RegistryMissingError(
            f"there is no registry at {sqlite_file}: `moduleserve-registry init` creates one "
            "there; to use another, pass --db (or set MODULESERVE_DB, or db in "
            "moduleserve.toml)"
        )
    current, head = current_revision(db.engine), head_revision()
    if current != head:
        raise SchemaOutdatedError(
            f"the registry schema is at {current or 'nothing'}, this release needs {head}: "
            "run `moduleserve-registry init` to migrate it"
        )


@contextlib.contextmanager
def _migration_lock(db: Database) -> Iterator[None]:
    """PostgreSQL: an advisory lock. SQLite: an flock on a file beside the database."""
    if not db.is_sqlite:
        with db.engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
        return
    database = db.engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
