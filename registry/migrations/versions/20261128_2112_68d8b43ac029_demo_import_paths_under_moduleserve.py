"""demo import paths under moduleserve

Why: the folders client/, server/ and registry/ are now installed as moduleserve.client,
moduleserve.server and moduleserve.registry, so no generic top-level `registry` package exists
any more and the demo classes import as `moduleserve.registry.demo...`. Registered classes
store their import path, so existing registries' `registry.demo.models:MyNet` rows would no
longer import (nor pass the allowed-prefix check); this data migration rewrites them to
`moduleserve.registry.demo.models:MyNet` (and back on downgrade). Nothing else in the schema
changes; classes outside the demo package are left as they are.

Revision ID: 68d8b43ac029
Revises: 16aea0c29d18
Create Date: 2026-11-28 21:12:09.075945
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "68d8b43ac029"
down_revision: str | None = "16aea0c29d18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_PREFIX = "registry.demo"
NEW_PREFIX = "moduleserve.registry.demo"

_classes = sa.table(
    "module_classes",
    sa.column("id", sa.Integer()),
    sa.column("import_path", sa.String(512)),
)


def _rename_prefix(old: str, new: str) -> None:
    """`old.module:Class` and `old:Class` become `new.module:Class` and `new:Class`."""
    path = _classes.c.import_path
    under_old = sa.or_(
        path.startswith(old + ".", autoescape=True), path.startswith(old + ":", autoescape=True)
    )
    op.execute(
        _classes.update()
        .where(under_old)
        .values(import_path=sa.literal(new) + sa.func.substr(path, len(old) + 1))
    )


def upgrade() -> None:
    _rename_prefix(OLD_PREFIX, NEW_PREFIX)


def downgrade() -> None:
    _rename_prefix(NEW_PREFIX, OLD_PREFIX)
