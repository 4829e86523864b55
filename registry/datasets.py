"""Datasets for fine-tuning: named tensors stored as content-addressed blobs."""

from __future__ import annotations

import builtins
from typing import Any

import sqlalchemy as sa

from moduleserve.registry.db import Database
from moduleserve.registry.entities import Dataset
from moduleserve.registry.errors import AlreadyExistsError, DatasetNotFoundError
from moduleserve.registry.names import check_name
from moduleserve.registry.orm import DatasetRow, utcnow


class Datasets:
    """The dataset table; blobs are written by the caller before `add`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(
        self, name: str, digest: str, size: int, tensors: dict[str, Any], description: str = ""
    ) -> Dataset:
        """Record a dataset whose blob is already stored."""
        check_name("dataset", name)
        with self._db.write() as session:
            if session.scalar(sa.select(DatasetRow.id).where(DatasetRow.name == name)):
                raise AlreadyExistsError(f"dataset {name!r} already exists")
            row = DatasetRow(
                name=name,
                digest=digest,
                size=size,
                tensors=tensors,
                description=description,
                created_at=utcnow(),
            )
            session.add(row)
            return _dataset(row)

    def get(self, name: str) -> Dataset:
        """One dataset by name."""
        with self._db.read() as session:
            row = session.scalar(sa.select(DatasetRow).where(DatasetRow.name == name))
            if row is None:
                check_name("dataset", name)
                raise DatasetNotFoundError(name)
            return _dataset(row)

    def list(self) -> list[Dataset]:
        """Every dataset, by name."""
        with self._db.read() as session:
            return [
                _dataset(r)
                for r in session.scalars(sa.select(DatasetRow).order_by(DatasetRow.name))
            ]

    def delete(self, name: str) -> Dataset:
        """Remove a dataset's record (its blob goes at the next `gc`)."""
        with self._db.write() as session:
            row = session.scalar(sa.select(DatasetRow).where(DatasetRow.name == name))
            if row is None:
                raise DatasetNotFoundError(name)
            dataset = _dataset(row)
            session.delete(row)
            return dataset

    def referenced_digests(self) -> dict[str, builtins.list[str]]:
        """Digest → the datasets that point at it."""
        with self._db.read() as session:
            result: dict[str, list[str]] = {}
            for digest, name in session.execute(sa.select(DatasetRow.digest, DatasetRow.name)):
                result.setdefault(digest, []).append(f"dataset {name}")
            return result


def _dataset(row: DatasetRow) -> Dataset:
    return Dataset(
        name=row.name,
        digest=row.digest,
        size=row.size,
        tensors=dict(row.tensors),
        description=row.description,
        created_at=row.created_at,
    )
