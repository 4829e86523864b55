"""Shared test helpers (imported by tests, never from a conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from registry.config import RegistrySettings

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "MODULESERVE_TEST_POSTGRES_URL"
DEMO_PREFIXES = ["registry.demo", "tests.models"]


def postgres_url() -> str | None:
    """The PostgreSQL URL CI sets, or None when no PostgreSQL is configured."""
    return os.environ.get(POSTGRES_ENV) or None


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh schema for one test; yields a URL whose search_path points at it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    sep = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{sep}options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def registry_settings(db_url: str, store: Path) -> RegistrySettings:
    """Settings for a test registry: the demo classes and the tests' own classes allowed."""
    return RegistrySettings(db=db_url, store=store, allowed_class_prefixes=DEMO_PREFIXES)


def subprocess_env(db_url: str, store: Path) -> dict[str, str]:
    """Environment for a child process that opens the same registry."""
    env = dict(os.environ)
    env.update(
        {
            "MODULESERVE_DB": db_url,
            "MODULESERVE_STORE": str(store),
            "MODULESERVE_ALLOWED_CLASS_PREFIXES": '["registry.demo", "tests.models"]',
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -c code` in a child process and return its result."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
