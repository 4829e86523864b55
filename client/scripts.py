"""Console-script entry points for the registry, the server and the job worker.

They live in the light client package so that a client-only install (no `server` extra)
still has working scripts: without sqlalchemy, torch and the rest each one says which
extra to install, in one sentence and exit code 2, instead of a ModuleNotFoundError
traceback. With the extra installed they run the real `main`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# Top-level modules the `server` extra brings (pyproject.toml) that these scripts import.
_REGISTRY_NEEDS = ("sqlalchemy", "alembic", "pydantic_settings", "safetensors", "torch")
_SERVER_NEEDS = (*_REGISTRY_NEEDS, "prometheus_client")


def _missing(modules: tuple[str, ...]) -> bool:
    """Whether any of the modules cannot be imported (found without importing it)."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return True
        except (ImportError, ValueError):
            return True
    return False


def _run(script: str, target: str, needs: tuple[str, ...]) -> int:
    if _missing(needs):
        print(
            f"error: {script} needs the server extra: pip install 'moduleserve[server]'",
            file=sys.stderr,
        )
        return 2
    module, _, attr = target.partition(":")
    main = getattr(importlib.import_module(module), attr)
    return int(main())


def registry_main() -> int:
    """`moduleserve-registry`."""
    return _run("moduleserve-registry", "moduleserve.registry.cli:main", _REGISTRY_NEEDS)


def server_main() -> int:
    """`moduleserve-server`."""
    return _run("moduleserve-server", "moduleserve.server.cli:main", _SERVER_NEEDS)


def worker_main() -> int:
    """`moduleserve-worker`."""
    return _run("moduleserve-worker", "moduleserve.server.jobs.worker:main", _SERVER_NEEDS)
