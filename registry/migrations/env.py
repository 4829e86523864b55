"""Alembic environment: runs on the connection the registry hands over, or opens one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from alembic import context

from moduleserve.registry.orm import Base

config = context.config
target_metadata = Base.metadata


def run_migrations(connection: sa.Connection) -> None:
    """Configure the context on `connection` and run the pending migrations."""
    if connection.dialect.name == "sqlite":
        with _sqlite_foreign_keys_off(connection):
            _run(connection)
    else:
        _run(connection)


@contextlib.contextmanager
def _sqlite_foreign_keys_off(connection: sa.Connection) -> Iterator[None]:
    """Batch mode copies a table, drops the original and renames the copy; with foreign
    keys on, that drop deletes every row that refers to the table (ON DELETE CASCADE: a
    batch change to `models` would delete every version). SQLite ignores the pragma inside
    a transaction, so it is set between transactions, and the keys are checked after."""
    if connection.in_transaction():
        connection.commit()
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    except BaseException:
        if connection.in_transaction():
            connection.rollback()  # else the pragma below would be ignored too
        raise
    else:
        if connection.in_transaction():
            connection.commit()
    finally:
        raw.execute("PRAGMA foreign_keys=ON")
    broken = raw.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken}")


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


shared = config.attributes.get("connection")
if shared is not None:
    run_migrations(shared)
else:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        run_migrations(conn)
        conn.commit()
