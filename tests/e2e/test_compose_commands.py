"""The commands docker-compose.yml runs, run here as plain processes (no Docker on CI).

Each service's entrypoint, command and environment come from the compose file itself;
only what Docker would map differently is rewritten: the `/data` volume becomes a
temporary folder, the database URL points at this machine's PostgreSQL, and servers
bind 127.0.0.1 on an ephemeral port (reported through --port-file).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from moduleserve.client.client import ModelClient
from tests.helpers import REPO, postgres_schema, postgres_url

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
BIN = Path(sys.executable).parent


def command(service: str, *override: str) -> list[str]:
    """Entrypoint + command; arguments given replace the command (`docker compose run`)."""
    spec = COMPOSE["services"][service]
    return [*(spec.get("entrypoint") or []), *(override or spec["command"])]


def environment(service: str, data: Path, db_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MODULESERVE_TOKEN", "e2e-token")  # what .env must give (no default)
    for key, value in COMPOSE["services"][service]["environment"].items():
        env[key] = interpolate(value, env).replace("/data", str(data))
    env["PYTHONPATH"] = str(REPO)  # the /models mount: the tests' classes live here
    if db_url is not None:
        env["MODULESERVE_DB"] = db_url
    return env


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default}, ${VAR-default} and ${VAR:?error} forms."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if op == ":?":
            if not env.get(name):
                raise AssertionError(f"compose would refuse: {arg}")
            return env[name]
        if op == "-":
            return env.get(name, arg)
        return env.get(name) or arg

    return re.sub(r"\$\{(\w+)(:-|-|:\?)([^}]*)\}", one, value)


def run(service: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(service, *extra), env=env, capture_output=True, text=True, timeout=180, cwd=REPO
    )


class ServerProcess:
    """A compose server command as a process on 127.0.0.1 and an ephemeral port."""

    def __init__(self, service: str, env: dict[str, str], workdir: Path) -> None:
        self.port_file = workdir / f"{service}.port"
        self.log = (workdir / f"{service}.log").open("w")
        args = [
            *command(service),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--port-file",
            str(self.port_file),
        ]
        self.proc = subprocess.Popen(
            args, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO
        )
        deadline = time.monotonic() + 90
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((workdir / f"{service}.log").read_text())
            time.sleep(0.05)
        self.target = f"127.0.0.1:{self.port_file.read_text()}"

    def healthcheck(self, env: dict[str, str]) -> int:
        test = COMPOSE["services"]["server"]["healthcheck"]["test"][1:]  # drop "CMD"
        args = [self.target if arg == "127.0.0.1:8001" else arg for arg in test]
        return subprocess.run(args, env=env, capture_output=True, timeout=60).returncode

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code


class WorkerProcess:
    """A compose worker command as a process."""

    def __init__(self, service: str, env: dict[str, str], workdir: Path) -> None:
        self.log = (workdir / f"{service}.log").open("w")
        env = {**env, "MODULESERVE_JOB_POLL_S": "0.2", "MODULESERVE_JOB_NICE": "0"}
        self.proc = subprocess.Popen(
            command(service), env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code


def admin_token(env: dict[str, str]) -> str:
    """The compose stack's admin token (starting jobs and uploading data need it)."""
    return str(json.loads(env["MODULESERVE_TOKENS"])[0])


def fine_tune_through(client: ModelClient, jobs: int = 1) -> list[str]:
    """Upload a small dataset, queue `jobs` one-epoch jobs on mlp, wait; the final states."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((64, 784)).astype(np.float32)
    client.upload_dataset("toy", {"inputs": inputs, "targets": inputs[:, :10].argmax(axis=1)})
    ids = [client.jobs.create("mlp", dataset="toy", seed=i).id for i in range(jobs)]
    deadline = time.monotonic() + 120
    states = [client.jobs.get(i).state for i in ids]
    while set(states) - {"succeeded", "failed", "cancelled"} and time.monotonic() < deadline:
        time.sleep(0.2)
        states = [client.jobs.get(i).state for i in ids]
    return states


def test_the_stack_has_no_default_token_and_outlasts_the_shutdown_grace() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    assert "change-me" not in text
    with pytest.raises(AssertionError, match=r"set MODULESERVE_TOKEN in \.env"):
        interpolate(COMPOSE["services"]["server"]["environment"]["MODULESERVE_TOKENS"], {})
    from moduleserve.server.config import ServerSettings

    grace = ServerSettings.model_fields["shutdown_grace_s"].default
    stop_after = COMPOSE["x-image"]["stop_grace_period"]
    assert stop_after.endswith("s") and float(stop_after[:-1]) > grace + 10
    assert "TORCH_INDEX_URL" in COMPOSE["x-image"]["build"]["args"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_sqlite_compose_stack(data: Path, tmp_path: Path) -> None:
    env = environment("init", data)
    init = run("init", env)
    assert init.returncode == 0, init.stderr
    assert "pushed mynet:1" in init.stdout
    server = ServerProcess("server", environment("server", data), tmp_path)
    worker = WorkerProcess("worker", environment("worker", data), tmp_path)
    try:
        assert server.healthcheck(env) == 0
        with ModelClient(server.target, token=admin_token(env)) as client:
            assert client.infer("mynet", np.zeros((3, 8, 8), np.float32)).shape == (10,)
            assert fine_tune_through(client) == ["succeeded"]
        metrics_url = _metrics_url(tmp_path / "server.log")
        body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        assert 'moduleserve_requests_total{model="mynet",outcome="success",version="1"} 1.0' in body
        admin = run("admin", environment("admin", data))
        assert admin.returncode == 0 and "mynet" in admin.stdout
    finally:
        assert server.stop() == 0
        assert worker.stop() == 0


def _metrics_url(log: Path) -> str:
    match = re.search(r"metrics: (http://\S+/metrics)", log.read_text())
    assert match, log.read_text()
    return match.group(1)


@pytest.fixture
def pg_url() -> Iterator[str]:
    base = postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL configured (set MODULESERVE_TEST_POSTGRES_URL)")
    with postgres_schema(base) as url:
        yield url


def test_postgres_compose_stack_with_two_servers(data: Path, tmp_path: Path, pg_url: str) -> None:
    init = run("init-pg", environment("init-pg", data, pg_url))
    assert init.returncode == 0, init.stderr
    servers = [
        ServerProcess(name, environment(name, data, pg_url), tmp_path)
        for name in ("server-pg-1", "server-pg-2")
    ]
    workers = [
        WorkerProcess(name, environment(name, data, pg_url), tmp_path)
        for name in ("worker-pg-1", "worker-pg-2")
    ]
    try:
        x = np.zeros((3, 8, 8), np.float32)
        token = admin_token(environment("server-pg-1", data, pg_url))
        clients = [ModelClient(s.target, token=token) for s in servers]
        first = [c.infer("mynet", x) for c in clients]
        np.testing.assert_array_equal(first[0], first[1])
        admin_env = environment("admin-pg", data, pg_url)
        exported = tmp_path / "mynet.safetensors"
        assert run("admin-pg", admin_env, "export", "mynet:1", str(exported)).returncode == 0
        pushed = run("admin-pg", admin_env, "push", "mynet", str(exported), "--alias", "production")
        assert pushed.returncode == 0 and pushed.stdout.strip() == "mynet:2", pushed.stderr
        # Both servers pick up the alias move from the shared registry.
        deadline = time.monotonic() + 30
        versions: set[str] = set()
        while versions != {"2"} and time.monotonic() < deadline:
            versions = {_served_version(c) for c in clients}
            time.sleep(0.2)
        assert versions == {"2"}
        # Jobs queued through one server are run by the two workers, each exactly once.
        assert fine_tune_through(clients[1], jobs=4) == ["succeeded"] * 4
        for client in clients:
            client.close()
    finally:
        assert [s.stop() for s in servers] == [0, 0]
        assert [w.stop() for w in workers] == [0, 0]


def _served_version(client: ModelClient) -> str:
    from moduleserve.client.pb import oip_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="mynet")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(bytes(4 * 3 * 8 * 8))
    return client.call("ModelInfer", request).model_version
