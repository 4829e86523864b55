"""Starting `moduleserve-server`: ports already in use, what it logs, token files, metrics."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import UnauthenticatedError
from moduleserve.registry.api import Registry
from moduleserve.server.app import redact_url
from moduleserve.server.cli import main as server_main
from moduleserve.server.config import ServerSettings
from tests.helpers import DEMO_PREFIXES, REPO, ServerThread, server_settings


@pytest.fixture
def served_with_metrics(demo_registry: Registry) -> Iterator[ServerThread]:
    """A server over the demo registry with its metrics endpoint on an ephemeral port."""
    settings = server_settings(
        demo_registry.settings.database_url(), demo_registry.settings.store, metrics_port=0
    )
    server = ServerThread(settings)
    yield server
    server.stop()


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port some other program listens on (no SO_REUSEPORT, as any plain server)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def run_server(registry: Registry, tmp_path: Path, *flags: str) -> tuple[int | None, str]:
    """`python -m moduleserve.server` on the registry: (exit code, stderr) once it exits, or (None,
    stderr so far) once it serves (the port file appears; then it is stopped)."""
    port_file = tmp_path / "port"
    args = [sys.executable, "-m", "moduleserve.server", "--db", registry.settings.database_url()]
    args += ["--store", str(registry.settings.store), "--job-workers", "0"]
    args += ["--port-file", str(port_file), *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while proc.poll() is None and not port_file.exists():
        assert time.monotonic() < deadline, "the server neither served nor exited"
        time.sleep(0.05)
    if proc.poll() is None:  # it serves: the failure this test looks for did not happen
        proc.terminate()
        return None, proc.communicate(timeout=60)[1]
    return proc.returncode, proc.communicate(timeout=60)[1]


def test_a_second_server_on_a_used_grpc_port_is_refused(
    demo_registry: Registry, served: ServerThread, tmp_path: Path
) -> None:
    code, stderr = run_server(
        demo_registry, tmp_path, "--grpc-port", str(served.port), "--no-metrics"
    )
    assert code == 1, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: port {served.port} is in use (another server?); pick another with --grpc-port"
    )
    assert "Traceback" not in stderr
    with ModelClient(served.target) as client:
        assert client.health() == "SERVING"  # the first server still has the port


def test_a_used_metrics_port_is_one_sentence_and_the_start_names_the_registry(
    demo_registry: Registry, listening_port: int, tmp_path: Path
) -> None:
    code, stderr = run_server(
        demo_registry, tmp_path, "--grpc-port", "0", "--metrics-port", str(listening_port)
    )
    assert code == 1, stderr
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr
    *logs, last = stderr.strip().splitlines()
    assert last == (
        f"error: port {listening_port} is in use (another server?); "
        "pick another with --metrics-port (or --no-metrics)"
    )
    settings = demo_registry.settings
    [started] = [line for line in logs if "registry: database" in line]
    assert started.endswith(
        f"INFO moduleserve.server.app: registry: database {settings.database_url()}, "
        f"blob store {settings.store.resolve()}"
    )


def test_a_model_that_does_not_load_fails_the_start_with_one_sentence(
    demo_registry: Registry, tmp_path: Path
) -> None:
    code, stderr = run_server(
        demo_registry,
        tmp_path,
        *("--grpc-port", "0", "--metrics-port", "0", "--log-level", "WARNING"),
        *("--load", "mynet", "--load", "nosuch:2"),
    )
    assert code == 1, stderr
    [line] = stderr.strip().splitlines()  # no "Event loop is closed" traceback after it
    assert line == "error: cannot load 'nosuch:2' at start: model 'nosuch' not found", line


def test_load_all_fails_the_start_naming_a_model_whose_class_may_not_load(
    demo_registry: Registry, tmp_path: Path
) -> None:
    # The server is not told --allow-prefix tests.models: `doubler`'s class is refused.
    code, stderr = run_server(
        demo_registry,
        tmp_path,
        *("--grpc-port", "0", "--metrics-port", "0", "--log-level", "WARNING", "--load-all"),
    )
    assert code == 1, stderr
    line = stderr.strip().splitlines()[-1]  # after the cache's warning with the details
    assert line.startswith("error: cannot load 'doubler' at start: "), line
    assert "outside this server's allowed class prefixes" in line


def test_preload_still_serves_and_says_it_is_deprecated(
    demo_registry: Registry, tmp_path: Path
) -> None:
    code, stderr = run_server(
        demo_registry,
        tmp_path,
        *("--grpc-port", "0", "--metrics-port", "0", "--log-level", "WARNING"),
        *("--preload", "mynet"),
    )
    assert code is None, stderr  # it served
    assert "--preload (MODULESERVE_PRELOAD, preload in moduleserve.toml) is deprecated" in stderr


def test_the_logged_database_url_hides_its_password() -> None:
    url = "postgresql+psycopg://admin:s3cret@db.example:5432/registry"
    assert redact_url(url) == "postgresql+psycopg://admin:***@db.example:5432/registry"
    assert redact_url("sqlite:////data/registry.db") == "sqlite:////data/registry.db"
    assert "s3cret" not in redact_url("not a url://admin:s3cret@host/db")


def test_tokens_from_a_token_file_guard_mutating_calls(
    demo_registry: Registry, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# operators\n\n  first-token  \nsecond-token\n")
    settings = server_settings(
        demo_registry.settings.database_url(), demo_registry.settings.store, token_file=token_file
    )
    assert settings.tokens == ["first-token", "second-token"]  # type: ignore[attr-defined]
    server = ServerThread(settings)
    try:
        with ModelClient(server.target) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.load("doubler")
        with ModelClient(server.target, token="second-token") as operator:
            operator.load("doubler")
            assert operator.health() == "SERVING"
    finally:
        server.stop()


def test_the_token_file_variable_adds_read_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "read").write_text("reader\n")
    monkeypatch.setenv("MODULESERVE_READ_TOKEN_FILE", str(tmp_path / "read"))
    settings = ServerSettings(read_tokens=["cli"], allowed_class_prefixes=DEMO_PREFIXES)
    assert settings.read_tokens == ["cli", "reader"]


@pytest.mark.parametrize("flag", ["--token-file", "--read-token-file"])
@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_a_missing_or_empty_token_file_is_a_usage_error(
    flag: str, content: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    assert server_main([flag, str(path), "--grpc-port", "0"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    reason = "No such file or directory" if content is None else "holds no tokens"
    assert line.startswith("error: invalid settings: ") and str(path) in line
    assert f"({flag})" in line and reason in line


def test_idle_metrics_connections_hold_no_thread(served_with_metrics: ServerThread) -> None:
    port = served_with_metrics.app.metrics_port
    before = psutil.Process().num_threads()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        for sock in idle:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and then nothing more
        scrape = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2):  # keep-alive: two scrapes on one connection
            scrape.request("GET", "/metrics")
            reply = scrape.getresponse()
            assert reply.status == 200
            assert b"moduleserve_loaded_models 0.0" in reply.read()
        # Connections are accepted in order, so the 50 idle ones were all accepted by now.
        assert psutil.Process().num_threads() - before < 10
        scrape.request("GET", "/other")
        assert scrape.getresponse().status == 404
        scrape.close()
    finally:
        for sock in idle:
            sock.close()
