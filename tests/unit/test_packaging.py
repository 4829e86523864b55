"""The folders install as moduleserve.*, nothing generic is importable outside the repository,
the client stays light, and the server scripts name their extra when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points, version
from pathlib import Path

import moduleserve.client
import moduleserve.registry
import moduleserve.server
from moduleserve.registry.api import Registry
from tests.helpers import REPO


def test_packages_resolve_inside_the_repository() -> None:
    for package, folder in (
        (moduleserve.client, "client"),
        (moduleserve.registry, "registry"),
        (moduleserve.server, "server"),
    ):
        path = Path(package.__file__ or "").resolve()
        assert path == REPO / folder / "__init__.py", package.__name__


def _outside_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_outside_the_repository_only_the_moduleserve_names_import(tmp_path: Path) -> None:
    code = (
        "import importlib.util, moduleserve.client, moduleserve.registry, moduleserve.server; "
        "print([importlib.util.find_spec(n) for n in ('client', 'server', 'registry')])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
        env=_outside_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[None, None, None]"


def test_importing_the_client_pulls_in_neither_sqlalchemy_nor_the_server() -> None:
    modules = (
        "moduleserve.client, moduleserve.client.tables, moduleserve.client.client, "
        "moduleserve.client.cli, moduleserve.client.introspection, moduleserve.client.inspect_cli, "
        "moduleserve.client.introspection_results, moduleserve.client.inspect_render, "
        "moduleserve.client.jobs, moduleserve.client.jobs_cli, moduleserve.client.jobs_render, "
        "moduleserve.client.scripts"
    )
    heavy = ("sqlalchemy", "moduleserve.server", "moduleserve.registry", "torch", "matplotlib")
    code = f"import sys, {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"


def test_console_scripts_point_at_the_light_entry_points() -> None:
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["moduleserve"] == "moduleserve.client.cli:main"
    for name in ("registry", "server", "worker"):
        assert scripts[f"moduleserve-{name}"] == f"moduleserve.client.scripts:{name}_main"


_WITHOUT_THE_EXTRA = """
import sys
for name in ("sqlalchemy", "torch"):
    sys.modules[name] = None  # as on a client-only install: importing them fails
from moduleserve.client import scripts
sys.argv = [sys.argv[1], "--help"]
raise SystemExit(getattr(scripts, sys.argv[0].removeprefix("moduleserve-") + "_main")())
"""


def test_server_scripts_without_the_server_extra_name_it() -> None:
    for script in ("moduleserve-registry", "moduleserve-server", "moduleserve-worker"):
        result = subprocess.run(
            [sys.executable, "-c", _WITHOUT_THE_EXTRA, script],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr == (
            f"error: {script} needs the server extra: pip install 'moduleserve[server]'\n"
        )


def test_server_scripts_with_the_extra_run_the_real_command(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "moduleserve-registry"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, env=_outside_env()
    )
    assert result.returncode == 0, result.stderr
    assert "usage: moduleserve-registry" in result.stdout


def test_torch_floor_has_a_safe_weights_only_loader() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "torch>=2.10" in project["optional-dependencies"]["server"]
    major, minor = (int(p) for p in version("torch").split(".")[:2])
    assert (major, minor) >= (2, 10)


_READ_ONLY_COMMANDS = """
import contextlib, io, sys
from moduleserve.registry.cli import main

commands = [["list"], ["show", "mynet"], ["verify"], ["alias", "history", "mynet"],
            ["gc", "--dry-run"], ["datasets", "list"], ["classes", "list"],
            ["classes", "show", "MyNet"]]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [main(["--db", sys.argv[1], "--store", sys.argv[2], *c]) for c in commands]
print(codes, "torch" in sys.modules, "mynet" in out.getvalue())
"""


def test_registry_commands_without_weights_do_not_import_torch(demo_registry: Registry) -> None:
    # torch's import takes 1-2 s; admin scripts calling list/show/verify should not pay it.
    settings = demo_registry.settings
    argv = [sys.executable, "-c", _READ_ONLY_COMMANDS, settings.database_url(), str(settings.store)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 0, 0, 0, 0, 0, 0, 0] False True", result.stderr
