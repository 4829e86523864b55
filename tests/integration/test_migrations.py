"""Alembic migrations: head matches the ORM, downgrade and upgrade work, the server checks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from moduleserve.registry.db import (
    Database,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    migrate,
)
from moduleserve.registry.errors import SchemaOutdatedError
from moduleserve.registry.orm import Base


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


_DEMO_RENAME = "68d8b43ac029"  # moves registry.demo import paths under moduleserve.registry.demo


def test_demo_import_paths_move_under_moduleserve_and_back(db_url: str) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    revision = scripts.get_revision(_DEMO_RENAME)
    assert revision is not None and revision.down_revision is not None
    db = Database(db_url)
    with db.engine.connect() as conn:
        command.upgrade(alembic_config(conn), str(revision.down_revision))
        conn.commit()
    old = {
        "MyNet": "registry.demo.models:MyNet",
        "Pkg": "registry.demo:Thing",
        "Own": "mymodels.nets:Own",
        "Lookalike": "registry.demolition:X",
        "Done": "moduleserve.registry.demo.models:MLP",
    }
    new = {
        **old,
        "MyNet": "moduleserve.registry.demo.models:MyNet",
        "Pkg": "moduleserve.registry.demo:Thing",
    }
    classes = sa.table(
        "module_classes",
        *(sa.column(c) for c in ("name", "import_path", "kwargs", "inputs", "outputs")),
        sa.column("description"),
        sa.column("created_at", sa.DateTime()),
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    with db.engine.begin() as conn:
        for name, path in old.items():
            conn.execute(
                classes.insert().values(
                    name=name, import_path=path, kwargs="{}", inputs="[]", outputs="[]",
                    description="", created_at=now,
                )
            )  # fmt: skip

    def paths() -> dict[str, str]:
        with db.engine.connect() as conn:
            rows = conn.execute(sa.select(classes.c.name, classes.c.import_path))
            return {name: path for name, path in rows}

    migrate(db)
    assert paths() == new
    with db.engine.connect() as conn:
        command.downgrade(alembic_config(conn), str(revision.down_revision))
        conn.commit()
    back = {**new, "MyNet": old["MyNet"], "Pkg": old["Pkg"]}
    back["Done"] = "registry.demo.models:MLP"  # already moved: the downgrade moves it too
    assert paths() == back
    db.dispose()


_NULLABLE_CLASS = "3785e04cdb20"  # models.class_id nullable: a batch (copy) migration on SQLite


def test_a_migration_that_copies_a_table_keeps_the_rows_that_refer_to_it(db_url: str) -> None:
    """SQLite's batch mode drops and recreates `models`; with foreign keys on, the drop
    would delete every version, alias and job of every model (ON DELETE CASCADE)."""
    revision = ScriptDirectory.from_config(alembic_config()).get_revision(_NULLABLE_CLASS)
    assert revision is not None and isinstance(revision.down_revision, str)
    db = Database(db_url)
    with db.engine.connect() as conn:
        command.upgrade(alembic_config(conn), revision.down_revision)
        conn.commit()
    now = datetime.now(UTC).replace(tzinfo=None)
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO module_classes (name, import_path, kwargs, inputs, outputs, "
                "description, created_at) VALUES ('C', 'pkg:C', '{}', '[]', '[]', '', :now)"
            ),
            {"now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO models (name, class_id, last_version, created_at) "
                "SELECT 'm', id, 1, :now FROM module_classes"
            ),
            {"now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO versions (model_id, version, digest, size, source, description, "
                "tags, metrics, created_at) SELECT id, 1, 'ab', 1, 'upload', '', '{}', '{}', :now "
                "FROM models"
            ),
            {"now": now},
        )

    migrate(db)

    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM versions")).scalar_one() == 1
        if db.is_sqlite:  # and the keys are enforced again afterwards
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    db.dispose()
