"""Listing the repository costs the same few SQL statements for 1 model or 10 (no 1+3N)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from tests.helpers import ServerThread, server_settings
from tests.models import Doubler

MAX_STATEMENTS = 3  # models with their class, versions, aliases


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    """The SELECT statements `engine` runs inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def push_models(registry: Registry, names: range) -> None:
    """Models m<i> with two versions each and `production` on the first."""
    if "Doubler" not in {c.name for c in registry.classes.list()}:
        registry.classes.register(
            "Doubler", "tests.models:Doubler", {}, [parse_input_spec("x:float32:-1,1")]
        )
    for index in names:
        for _ in range(2):
            registry.push(f"m{index}", Doubler().state_dict(), class_name="Doubler")
        registry.checkpoints.set_alias(f"m{index}", "production", 1)


def test_list_models_runs_the_same_statements_for_one_model_or_ten(registry: Registry) -> None:
    push_models(registry, range(1))
    with statements(registry.db.engine) as one:
        assert [m.versions for m in registry.checkpoints.list_models()] == [(1, 2)]
    push_models(registry, range(1, 10))
    with statements(registry.db.engine) as ten:
        models = registry.checkpoints.list_models()
    assert len(ten) == len(one) <= MAX_STATEMENTS, ten
    assert [m.name for m in models] == sorted(f"m{i}" for i in range(10))
    assert all(m.versions == (1, 2) and m.aliases == {"production": 1} for m in models)
    assert all(m.class_name == "Doubler" for m in models)


def test_repository_index_rpc_lists_ten_models_in_a_constant_number_of_queries(
    registry: Registry,
) -> None:
    push_models(registry, range(10))
    server = ServerThread(
        server_settings(registry.settings.database_url(), registry.settings.store)
    )
    try:
        with ModelClient(server.target) as client:
            with statements(server.app.registry.db.engine) as seen:
                entries = client.models()
            assert client.health() == "SERVING"
    finally:
        server.stop()
    assert len(seen) <= MAX_STATEMENTS, seen
    assert sorted((e.name, e.version) for e in entries) == sorted(
        (f"m{i}", v) for i in range(10) for v in ("1", "2")
    )
