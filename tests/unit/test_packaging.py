"""The generic top-level package names resolve here, and the client stays light."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import client
import registry
import server
from tests.helpers import REPO


def test_packages_resolve_inside_the_repository() -> None:
    for package in (client, registry, server):
        assert Path(package.__file__).resolve().is_relative_to(REPO), package.__name__


def test_importing_the_client_pulls_in_neither_sqlalchemy_nor_the_server() -> None:
    code = (
        "import sys, client, client.tables, client.client, client.cli, client.introspection, "
        "client.inspect_cli, client.jobs, client.jobs_cli, client.jobs_render; "
        "print(sorted(m for m in ('sqlalchemy', 'server', 'registry', 'torch', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"


def test_torch_floor_has_a_safe_weights_only_loader() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "torch>=2.10" in project["optional-dependencies"]["server"]
    major, minor = (int(p) for p in version("torch").split(".")[:2])
    assert (major, minor) >= (2, 10)


_READ_ONLY_COMMANDS = """
import contextlib, io, sys
from registry.cli import main

commands = [["list"], ["show", "mynet"], ["verify"], ["alias", "history", "mynet"],
            ["gc", "--dry-run"], ["datasets", "list"], ["classes", "list"],
            ["classes", "show", "MyNet"]]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [main(["--db", sys.argv[1], "--store", sys.argv[2], *c]) for c in commands]
print(codes, "torch" in sys.modules, "mynet" in out.getvalue())
"""


def test_registry_commands_without_weights_do_not_import_torch(
    demo_registry: registry.api.Registry,
) -> None:
    # torch's import takes 1-2 s; admin scripts calling list/show/verify should not pay it.
    settings = demo_registry.settings
    argv = [sys.executable, "-c", _READ_ONLY_COMMANDS, settings.database_url(), str(settings.store)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "[0, 0, 0, 0, 0, 0, 0, 0] False True", result.stderr
