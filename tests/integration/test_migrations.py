"""Alembic migrations: head matches the ORM, downgrade and upgrade work, the server checks."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from registry.db import (
    Database,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    migrate,
)
from registry.errors import SchemaOutdatedError
from registry.orm import Base


def test_upgrade_matches_the_orm_then_downgrade_and_upgrade_again(db_url: str) -> None:
    db = Database(db_url)
    migrate(db)
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    with db.engine.connect() as conn:
        command.downgrade(alembic_config(conn), "-1")
        conn.commit()
    assert current_revision(db.engine) != head_revision()
    with pytest.raises(SchemaOutdatedError, match="moduleserve-registry init"):
        check_schema(db)
    before, after = migrate(db)
    assert after == head_revision() and before != after
    check_schema(db)
    db.dispose()


def test_history_is_linear_and_every_migration_says_why() -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    assert len(scripts.get_heads()) == 1
    for revision in scripts.walk_revisions():
        assert "Why:" in (revision.module.__doc__ or ""), revision.revision
