"""Serving one's own class: moduleserve.toml found from any folder of the project, a class
path for a package that is not installed, allowed prefixes that add to the demo's, and
errors that name the setting that fixes them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.registry.cli import main as registry_cli
from moduleserve.server.config import ServerSettings
from tests.helpers import ServerThread

NETS = """
import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project folder with its package under src/ and a moduleserve.toml; cwd is a subfolder."""
    package = tmp_path / "src" / "ownnets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NETS)
    (tmp_path / "moduleserve.toml").write_text(
        'store = "data/store"\nallowed_class_prefixes = ["ownnets"]\nclass_path = ["src"]\n'
    )
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    for name in ("MODULESERVE_DB", "MODULESERVE_STORE", "MODULESERVE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    # Each test imports the package afresh from its own folder.
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "ownnets" or m.startswith("ownnets.")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in [m for m in sys.modules if m == "ownnets" or m.startswith("ownnets.")]:
        del sys.modules[name]


def test_a_project_file_makes_every_folder_use_one_registry_and_finds_the_class(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"weight": torch.tensor([1.0, 2.0, 3.0, 4.0])}, project / "scale.pth")
    assert registry_cli(["init"]) == 0
    register = ["classes", "register", "Scale", "ownnets.nets:Scale", "--input", "x:float32:-1,4"]
    assert registry_cli(register) == 0
    assert registry_cli(["push", "scale", str(project / "scale.pth"), "--class", "Scale"]) == 0
    assert (project / "data" / "registry.db").is_file()  # beside moduleserve.toml, not in cwd
    assert not (project / "notebooks" / "data").exists()
    capsys.readouterr()

    settings = ServerSettings(grpc_port=0, metrics_port=None, job_workers=0)
    assert settings.config_file == project / "moduleserve.toml"
    server = ServerThread(settings)
    try:
        with ModelClient(server.target) as client:
            out = client.infer("scale", np.ones((2, 4), np.float32))
            np.testing.assert_array_equal(out, [[1, 2, 3, 4], [1, 2, 3, 4]])
    finally:
        server.stop()


def test_the_errors_name_the_setting_that_fixes_them(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "moduleserve.toml").write_text('store = "data/store"\n')
    assert registry_cli(["init"]) == 0
    capsys.readouterr()

    register = ["classes", "register", "S", "ownnets.nets:Scale", "--input", "x:float32:-1,4"]
    assert registry_cli(register) == 1
    assert "allow it with --allow-prefix ownnets" in capsys.readouterr().err

    assert registry_cli(["--allow-prefix", "ownnets", *register]) == 1
    err = capsys.readouterr().err
    assert "cannot import 'ownnets'" in err and "--class-path" in err

    src = str(project / "src")
    assert registry_cli(["--allow-prefix", "ownnets", "--class-path", src, *register]) == 0


def test_allowed_prefixes_add_to_the_demos(project: Path) -> None:
    settings = ServerSettings(allowed_class_prefixes=["ownnets"])
    assert settings.allowed_prefixes() == ["moduleserve.registry.demo", "ownnets"]


def test_the_server_names_its_settings_file_and_a_model_it_has(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import signal
    import subprocess
    import sys as _sys

    torch.save({"weight": torch.ones(4)}, project / "scale.pth")
    register = ["classes", "register", "Scale", "ownnets.nets:Scale", "--input", "x:float32:-1,4"]
    assert registry_cli(["init"]) == 0 and registry_cli(register) == 0
    assert registry_cli(["push", "scale", str(project / "scale.pth"), "--class", "Scale"]) == 0
    port_file = project / "port"
    args = [_sys.executable, "-m", "moduleserve.server", "--grpc-port", "0", "--no-metrics"]
    args += ["--job-workers", "0", "--port-file", str(port_file)]
    proc = subprocess.Popen(
        args, cwd=project / "notebooks", env=dict(os.environ), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        banner = [proc.stdout.readline() for _ in range(6)]  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    text = "".join(banner)
    assert f"(settings from {project / 'moduleserve.toml'})" in text
    assert "infer scale --random" in text and "mynet" not in text


def test_flags_add_to_the_settings_files_prefixes(project: Path) -> None:
    from moduleserve.registry.cli import _settings, build_parser

    args = build_parser().parse_args(["--allow-prefix", "other", "--class-path", "lib", "list"])
    settings = _settings(args)
    assert settings.allowed_prefixes() == ["moduleserve.registry.demo", "ownnets", "other"]
    assert settings.class_path == [project / "src", Path("lib")]


def test_a_typo_a_string_class_path_and_a_foreign_file_are_handled(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = project / "moduleserve.toml"
    config.write_text('allowed_class_prefix = ["ownnets"]\n')
    assert registry_cli(["list"]) == 2
    assert "unknown setting 'allowed_class_prefix'; did you mean 'allowed_class_prefixes'?" in (
        capsys.readouterr().err
    )
    config.write_text('class_path = "src"\n')
    assert ServerSettings().class_path == [project / "src"]
    config.chmod(0o666)  # anyone may write it: it must not choose the code we import
    assert registry_cli(["list"]) == 2
    assert "refusing" in capsys.readouterr().err
