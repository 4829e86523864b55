"""a model outlives its deleted class

Why: `moduleserve-registry classes delete` removes a class registered by mistake once no
stored version uses it. A model whose versions were all deleted may still name that class;
its row must stay (it holds `last_version`, so version numbers are never reused), so
models.class_id becomes nullable: NULL until the model's next push names a class.

The downgrade cannot express such a model: it refuses while any exists.

Revision ID: 3785e04cdb20
Revises: 68d8b43ac029
Create Date: 2026-12-07 22:12:42.198711
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3785e04cdb20"
down_revision: str | None = "68d8b43ac029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.alter_column("class_id", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    models = sa.table("models", sa.column("name", sa.String()), sa.column("class_id"))
    orphans = op.get_bind().scalars(sa.select(models.c.name).where(models.c.class_id.is_(None)))
    names = list(orphans)
    if names:
        raise RuntimeError(
            f"model(s) {', '.join(names[:10])} have no class (it was deleted): push a version "
            "of each with --class before downgrading"
        )
    with op.batch_alter_table("models") as batch:
        batch.alter_column("class_id", existing_type=sa.Integer(), nullable=False)
