"""What the Dockerfile runs, run here as a process (no Docker on CI): `docker run` of the
image alone creates its registry, and refuses to listen on 0.0.0.0 without a token."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
BIN = Path(sys.executable).parent


def image_env(data: Path) -> dict[str, str]:
    """The image's ENV lines, with /data moved to a temporary folder."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    block = re.search(r"^ENV (.+?)(?=^\S)", DOCKERFILE, re.M | re.S)
    assert block is not None
    for name, value in re.findall(r"(\w+)=(\S+)", block[1].replace("\\\n", " ")):
        env[name] = value.replace("/data", str(data))
    env.pop("MODULESERVE_TOKENS", None)
    return env


def test_docker_run_alone_creates_the_registry_and_asks_for_a_token(tmp_path: Path) -> None:
    command = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M)[1])  # type: ignore[index]
    env = image_env(tmp_path / "data")
    assert float(env["MODULESERVE_SHUTDOWN_GRACE_S"]) < 10  # docker stop's default timeout

    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )

    assert result.returncode == 2, result.stderr
    assert (tmp_path / "data" / "registry.db").is_file()
    assert "refusing to listen on 0.0.0.0 without tokens" in result.stderr
    assert "Traceback" not in result.stderr
