"""Models, their checkpoint versions and aliases: the repository over those tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypedDict

import sqlalchemy as sa
from sqlalchemy.orm import Session

from moduleserve.registry.db import Database
from moduleserve.registry.entities import AliasEvent, Model, ModuleClass, Version
from moduleserve.registry.errors import (
    AliasConflictError,
    ClassMismatchError,
    ClassNotFoundError,
    ModelNotFoundError,
    VersionInUseError,
    VersionNotFoundError,
    WriteConflictError,
)
from moduleserve.registry.names import check_alias, check_name, check_version, parse_ref
from moduleserve.registry.orm import (
    AliasEventRow,
    AliasRow,
    ModelRow,
    ModuleClassRow,
    VersionRow,
    utcnow,
)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()
"""`expect=UNSET`: move the alias whatever it points at (no compare-and-set)."""


class _VersionFields(TypedDict):
    """The keyword arguments `add_version` hands to `add_version_in` on each attempt."""

    digest: str
    size: int
    parent: int | None
    source: str
    description: str
    tags: dict[str, Any]
    metrics: dict[str, Any]
    alias: str | None
    actor: str
    checked: ModuleClass | None


class Checkpoints:
    """Versions of models and the aliases that name them."""

    def __init__(self, db: Database, default_alias: str) -> None:
        self._db = db
        self.default_alias = default_alias

    # -- writing ---------------------------------------------------------------------------

    def add_version(
        self,
        model: str,
        digest: str,
        size: int,
        class_name: str,
        *,
        parent: int | None = None,
        source: str = "upload",
        description: str = "",
        tags: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        alias: str | None = None,
        actor: str = "api",
        checked: ModuleClass | None = None,
    ) -> Version:
        """Record a new version (its blob already stored); numbers are 1, 2, 3… per model.

        `checked` is the class as the weights were checked against it: the version is
        refused (WriteConflictError) if its spec has changed since."""
        check_name("model", model)
        if alias is not None:
            check_alias(alias)
        fields = _VersionFields(
            digest=digest,
            size=size,
            parent=parent,
            source=source,
            description=description,
            tags=dict(tags or {}),
            metrics=dict(metrics or {}),
            alias=alias,
            actor=actor,
            checked=checked,
        )
        # Two first pushes of a new model race to create it on PostgreSQL; the loser
        # retries and finds the winner's row.
        for attempt in range(3):
            try:
                with self._db.write() as session:
                    return self.add_version_in(session, model, class_name, **fields)
            except WriteConflictError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def add_version_in(
        self,
        session: Session,
        model: str,
        class_name: str,
        *,
        digest: str,
        size: int,
        parent: int | None,
        source: str,
        description: str,
        tags: dict[str, Any],
        metrics: dict[str, Any],
        alias: str | None,
        actor: str,
        checked: ModuleClass | None = None,
    ) -> Version:
        """`add_version` inside the caller's write transaction (a job's result and its state
        change commit together)."""
        model_row = self._model_for_push(session, model, class_name, checked)
        if parent is not None:
            _version_row(session, model_row, model, parent)
        # One atomic statement: concurrent writers each get the next number.
        number = session.execute(
            sa.update(ModelRow)
            .where(ModelRow.id == model_row.id)
            .values(last_version=ModelRow.last_version + 1)
            .returning(ModelRow.last_version)
        ).scalar_one()
        row = VersionRow(
            model_id=model_row.id,
            version=number,
            digest=digest,
            size=size,
            parent_version=parent,
            source=source,
            description=description,
            tags=tags,
            metrics=metrics,
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        if alias is not None:
            self._move_alias(session, model_row, alias, row, UNSET, actor)
        return _version(session, model_row, row)

    def _model_for_push(
        self, session: Session, model: str, class_name: str, checked: ModuleClass | None
    ) -> ModelRow:
        # A share lock: `classes update` (which locks the row to write it) waits for this
        # push, then finds its version among the ones it must check.
        class_row = session.scalar(
            sa.select(ModuleClassRow)
            .where(ModuleClassRow.name == class_name)
            .with_for_update(read=True)
        )
        if class_row is None:
            raise ClassNotFoundError(class_name)
        if checked is not None and (
            class_row.inputs != [s.to_dict() for s in checked.inputs]
            or class_row.outputs != [s.to_dict() for s in checked.outputs]
        ):
            raise WriteConflictError(
                f"class {class_name!r} was updated while this push was checked against it; "
                "nothing was stored, push again"
            )
        row = session.scalar(sa.select(ModelRow).where(ModelRow.name == model))
        if row is None:
            row = ModelRow(name=model, class_id=class_row.id, last_version=0, created_at=utcnow())
            session.add(row)
            session.flush()
        elif row.class_id is None:
            row.class_id = class_row.id  # its class was deleted with its last version
        elif row.class_id != class_row.id:
            existing = session.get_one(ModuleClassRow, row.class_id)
            raise ClassMismatchError(model, existing.name, class_name)
        return row

    def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expect: int | _Unset | None = UNSET,
        actor: str = "api",
    ) -> AliasEvent:
        """Point `alias` at `version`; with `expect`, only if it still points at that version."""
        check_alias(alias)
        with self._db.write() as session:
            model_row = _model_row(session, model)
            target = _version_row(session, model_row, model, version)
            return self._move_alias(session, model_row, alias, target, expect, actor)

    def unset_alias(
        self, model: str, alias: str, *, expect: int | _Unset | None = UNSET, actor: str = "api"
    ) -> AliasEvent:
        """Remove an alias (recorded in its history)."""
        check_alias(alias)
        with self._db.write() as session:
            model_row = _model_row(session, model)
            return self._move_alias(session, model_row, alias, None, expect, actor)

    def move_alias_in(
        self,
        session: Session,
        model: str,
        alias: str,
        version: int,
        *,
        expect: int | None,
        actor: str,
    ) -> bool:
        """Compare-and-set inside the caller's write transaction: move `alias` to `version`
        only if it still points at `expect`; False, with nothing changed, otherwise."""
        model_row = _model_row(session, model)
        target = _version_row(session, model_row, model, version)
        try:
            self._move_alias(session, model_row, alias, target, expect, actor)
        except AliasConflictError:
            return False
        return True

    def alias_version(self, model: str, alias: str) -> int | None:
        """The version an alias points at now, or None when it does not exist."""
        with self._db.read() as session:
            row = _alias_target(session, _model_row(session, model), alias)
            return row.version if row is not None else None

    def _move_alias(
        self,
        session: Session,
        model_row: ModelRow,
        alias: str,
        target: VersionRow | None,
        expect: int | _Unset | None,
        actor: str,
    ) -> AliasEvent:
        # The row is locked for the rest of the transaction on PostgreSQL (SQLite: the
        # IMMEDIATE transaction already holds the write lock), so compare-and-set is atomic.
        row = session.scalar(
            sa.select(AliasRow)
            .where(AliasRow.model_id == model_row.id, AliasRow.name == alias)
            .with_for_update()
        )
        current = session.get_one(VersionRow, row.version_id).version if row else None
        if not isinstance(expect, _Unset) and expect != current:
            raise AliasConflictError(model_row.name, alias, expect, current)
        if target is None and row is None:
            raise VersionNotFoundError(model_row.name, alias)
        if target is None:
            session.delete(row)
        elif row is None:
            session.add(
                AliasRow(
                    model_id=model_row.id, name=alias, version_id=target.id, updated_at=utcnow()
                )
            )
        else:
            row.version_id, row.updated_at = target.id, utcnow()
        event = AliasEventRow(
            model_id=model_row.id,
            alias=alias,
            from_version=current,
            to_version=target.version if target else None,
            actor=actor,
            at=utcnow(),
        )
        session.add(event)
        return _alias_event(model_row.name, event)

    def tag(
        self, model: str, ref: str, set_tags: Mapping[str, Any], remove: Sequence[str] = ()
    ) -> Version:
        """Add, change or remove tags of one version."""
        with self._db.write() as session:
            model_row = _model_row(session, model)
            row = self._resolve_row(session, model_row, ref)
            tags = {k: v for k, v in row.tags.items() if k not in remove}
            tags.update(set_tags)
            row.tags = tags
            return _version(session, model_row, row)

    def set_metrics(self, model: str, version: int, metrics: Mapping[str, Any]) -> Version:
        """Merge metrics into a version's record."""
        with self._db.write() as session:
            model_row = _model_row(session, model)
            row = _version_row(session, model_row, model, version)
            row.metrics = {**row.metrics, **metrics}
            return _version(session, model_row, row)

    def delete(
        self, model: str, version: int, *, force: bool = False, actor: str = "api"
    ) -> Version:
        """Delete one version; refused while aliases point at it unless `force`."""
        with self._db.write() as session:
            model_row = _model_row(session, model)
            row = _version_row(session, model_row, model, version)
            aliases = session.scalars(sa.select(AliasRow).where(AliasRow.version_id == row.id))
            alias_rows = list(aliases)
            if alias_rows and not force:
                raise VersionInUseError(model, version, sorted(a.name for a in alias_rows))
            deleted = _version(session, model_row, row)
            for alias_row in alias_rows:
                self._move_alias(session, model_row, alias_row.name, None, UNSET, actor)
            session.flush()
            session.delete(row)
            return deleted

    # -- reading ---------------------------------------------------------------------------

    def resolve(self, model: str, ref: str | int = "") -> Version:
        """A version by number, alias, or "" (the default alias if set, else the latest)."""
        with self._db.read() as session:
            model_row = _model_row(session, model)
            return _version(session, model_row, self._resolve_row(session, model_row, ref))

    def _resolve_row(self, session: Session, model_row: ModelRow, ref: str | int) -> VersionRow:
        parsed = parse_ref(ref)
        if isinstance(parsed, int):
            return _version_row(session, model_row, model_row.name, parsed)
        if parsed:
            row = _alias_target(session, model_row, parsed)
            if row is None:
                raise VersionNotFoundError(model_row.name, parsed)
            return row
        row = _alias_target(session, model_row, self.default_alias)
        if row is None:
            row = session.scalar(
                sa.select(VersionRow)
                .where(VersionRow.model_id == model_row.id)
                .order_by(VersionRow.version.desc())
                .limit(1)
            )
        if row is None:
            raise VersionNotFoundError(model_row.name, "latest")
        return row

    def get_model(self, model: str) -> Model:
        """One model with its versions and aliases."""
        with self._db.read() as session:
            return _model(session, _model_row(session, model))

    def list_models(self) -> list[Model]:
        """Every model with its versions and aliases, by name, in three queries whatever
        the number of models (RepositoryIndex and `models` list them all)."""
        with self._db.read() as session:
            models = session.execute(
                sa.select(ModelRow.id, ModelRow.name, ModelRow.created_at, ModuleClassRow.name)
                .outerjoin(ModuleClassRow, ModuleClassRow.id == ModelRow.class_id)
                .order_by(ModelRow.name)
            ).all()
            versions: dict[int, list[int]] = {}
            for model_id, number in session.execute(
                sa.select(VersionRow.model_id, VersionRow.version).order_by(VersionRow.version)
            ):
                versions.setdefault(model_id, []).append(number)
            aliases: dict[int, dict[str, int]] = {}
            for model_id, alias, number in session.execute(
                sa.select(AliasRow.model_id, AliasRow.name, VersionRow.version)
                .join(VersionRow, VersionRow.id == AliasRow.version_id)
                .order_by(AliasRow.name)
            ):
                aliases.setdefault(model_id, {})[alias] = number
        return [
            Model(
                name=name,
                class_name=class_name or "",
                versions=tuple(versions.get(model_id, ())),
                aliases=aliases.get(model_id, {}),
                created_at=created_at,
            )
            for model_id, name, created_at, class_name in models
        ]

    def list_versions(self, model: str) -> list[Version]:
        """Every version of a model, oldest first."""
        with self._db.read() as session:
            model_row = _model_row(session, model)
            rows = session.scalars(
                sa.select(VersionRow)
                .where(VersionRow.model_id == model_row.id)
                .order_by(VersionRow.version)
            )
            return _versions(session, model_row, list(rows))

    def alias_history(self, model: str, alias: str | None = None) -> list[AliasEvent]:
        """Alias moves of a model, oldest first (optionally of one alias)."""
        with self._db.read() as session:
            model_row = _model_row(session, model)
            query = sa.select(AliasEventRow).where(AliasEventRow.model_id == model_row.id)
            if alias is not None:
                query = query.where(AliasEventRow.alias == alias)
            rows = session.scalars(query.order_by(AliasEventRow.id))
            return [_alias_event(model, row) for row in rows]

    def referenced_digests(self) -> dict[str, list[str]]:
        """Digest → the `model:version` entries that point at it."""
        with self._db.read() as session:
            rows = session.execute(
                sa.select(VersionRow.digest, ModelRow.name, VersionRow.version).join(
                    ModelRow, ModelRow.id == VersionRow.model_id
                )
            )
            result: dict[str, list[str]] = {}
            for digest, name, number in rows:
                result.setdefault(digest, []).append(f"{name}:{number}")
            return result


def _model_row(session: Session, model: str) -> ModelRow:
    check_name("model", model)  # before the query: a 10 kB name is refused, not looked up
    row = session.scalar(sa.select(ModelRow).where(ModelRow.name == model))
    if row is None:
        raise ModelNotFoundError(model)
    return row


def _version_row(session: Session, model_row: ModelRow, model: str, version: int) -> VersionRow:
    check_version(version)  # past the column's range the database would raise, not refuse
    row = session.scalar(
        sa.select(VersionRow).where(
            VersionRow.model_id == model_row.id, VersionRow.version == version
        )
    )
    if row is None:
        raise VersionNotFoundError(model, str(version))
    return row


def _alias_target(session: Session, model_row: ModelRow, alias: str) -> VersionRow | None:
    return session.scalar(
        sa.select(VersionRow)
        .join(AliasRow, AliasRow.version_id == VersionRow.id)
        .where(AliasRow.model_id == model_row.id, AliasRow.name == alias)
    )


def _version(session: Session, model_row: ModelRow, row: VersionRow) -> Version:
    return _versions(session, model_row, [row])[0]


def _versions(session: Session, model_row: ModelRow, rows: Sequence[VersionRow]) -> list[Version]:
    """Rows → entities in two queries however many versions there are."""
    class_name = session.scalar(
        sa.select(ModuleClassRow.name).where(ModuleClassRow.id == model_row.class_id)
    )
    aliases: dict[int, list[str]] = {}
    for version_id, alias in session.execute(
        sa.select(AliasRow.version_id, AliasRow.name)
        .where(AliasRow.version_id.in_([row.id for row in rows]))
        .order_by(AliasRow.name)
    ):
        aliases.setdefault(version_id, []).append(alias)
    return [
        Version(
            model=model_row.name,
            version=row.version,
            class_name=class_name or "",
            digest=row.digest,
            size=row.size,
            parent_version=row.parent_version,
            source=row.source,
            description=row.description,
            tags=dict(row.tags),
            metrics=dict(row.metrics),
            created_at=row.created_at,
            aliases=tuple(aliases.get(row.id, ())),
        )
        for row in rows
    ]


def _model(session: Session, row: ModelRow) -> Model:
    class_name = session.scalar(
        sa.select(ModuleClassRow.name).where(ModuleClassRow.id == row.class_id)
    )
    versions = session.scalars(
        sa.select(VersionRow.version)
        .where(VersionRow.model_id == row.id)
        .order_by(VersionRow.version)
    )
    aliases = session.execute(
        sa.select(AliasRow.name, VersionRow.version)
        .join(VersionRow, VersionRow.id == AliasRow.version_id)
        .where(AliasRow.model_id == row.id)
        .order_by(AliasRow.name)
    )
    return Model(
        name=row.name,
        class_name=class_name or "",
        versions=tuple(versions),
        aliases={name: number for name, number in aliases},
        created_at=row.created_at,
    )


def _alias_event(model: str, row: AliasEventRow) -> AliasEvent:
    return AliasEvent(
        model=model,
        alias=row.alias,
        from_version=row.from_version,
        to_version=row.to_version,
        actor=row.actor,
        at=row.at,
    )
