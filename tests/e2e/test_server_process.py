"""`moduleserve-server` as a process: SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from tests.helpers import REPO
from tests.models import SlowNet


def start_server(
    registry: Registry, port_file: Path, *flags: str, new_session: bool = False
) -> subprocess.Popen[str]:
    """`python -m moduleserve.server` on the registry, ephemeral port; returns once the port
    file exists."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [
        sys.executable,
        "-m",
        "moduleserve.server",
        "--db",
        registry.settings.database_url(),
        "--store",
        str(registry.settings.store),
        "--allow-prefix",
        "moduleserve.registry.demo",
        "--allow-prefix",
        "tests.models",
        "--grpc-port",
        "0",
        "--no-metrics",
        "--port-file",
        str(port_file),
        *flags,
    ]
    proc = subprocess.Popen(
        args,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,  # a process group of its own, as from a terminal
    )
    deadline = time.monotonic() + 90
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    return proc


def test_sigterm_finishes_in_flight_requests_and_exits_zero(
    demo_registry: Registry, tmp_path: Path
) -> None:
    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 1.0}, [parse_input_spec("x:float32:-1,2")]
    )
    demo_registry.push("slow", SlowNet(1.0).state_dict(), class_name="Slow")
    port_file = tmp_path / "port"
    proc = start_server(demo_registry, port_file, "--load", "slow")
    target = f"127.0.0.1:{port_file.read_text()}"
    results: list[np.ndarray] = []
    with ModelClient(target) as client:
        assert client.ready("slow")  # --load loaded it before the port file appeared
        client.metadata("slow")  # cached: the infer below goes straight to ModelInfer
        pending = threading.Thread(
            target=lambda: results.append(client.infer("slow", np.ones(2, np.float32)))
        )
        pending.start()
        time.sleep(0.3)  # the 1 s forward is running
        proc.send_signal(signal.SIGTERM)
        pending.join(timeout=30)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert len(results) == 1 and results[0].shape == (2,)
    assert "shutting down" in output and "stopped" in output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_drain_cuts_no_accepted_call_and_tells_watchers(
    demo_registry: Registry, tmp_path: Path, sig: signal.Signals
) -> None:
    """Calls back to back on one connection while the server stops: each one is either
    answered or refused before it started (UNAVAILABLE, or a closed port), never cut
    midway; a health watcher hears NOT_SERVING. SIGINT is Ctrl-C, sent to the whole
    process group as a terminal does."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moduleserve.client.oip import method_path
    from moduleserve.client.pb import oip_v2_pb2 as pb

    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 0.2}, [parse_input_spec("x:float32:-1,2")]
    )
    demo_registry.push("slow", SlowNet(0.2).state_dict(), class_name="Slow")
    port_file = tmp_path / "port"
    proc = start_server(
        demo_registry, port_file, "--load", "slow", "--job-workers", "0", new_session=True
    )
    target = f"127.0.0.1:{port_file.read_text()}"
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(bytes(8))
    answered, refused, cut = 0, [], []
    statuses: list[int] = []
    stopping = threading.Event()

    def watch(channel: grpc.Channel) -> None:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        with contextlib.suppress(grpc.RpcError):
            for update in stream:
                statuses.append(update.status)

    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(method_path("ModelInfer"))
        watcher = threading.Thread(target=watch, args=(channel,))
        watcher.start()
        timer = threading.Timer(0.7, lambda: (stopping.set(), os.killpg(proc.pid, sig)))
        timer.start()
        while not stopping.is_set() or proc.poll() is None:
            try:
                infer(request.SerializeToString(), timeout=10, wait_for_ready=False)
                answered += 1
            except grpc.RpcError as error:
                details = (error.details() or "").lower()
                # Refused before it started: the port closed, or the draining server's
                # UNAVAILABLE for new calls (as grpc.aio's after stop()).
                if any(word in details for word in ("connect", "refused", "shutting down")):
                    refused.append(details)
                    if proc.poll() is not None or len(refused) > 50:
                        break
                    time.sleep(0.05)
                else:
                    cut.append(f"{error.code().name}: {details}")
        watcher.join(timeout=30)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert cut == [], cut
    assert answered >= 3
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses


def test_bad_settings_exit_2_with_one_sentence(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moduleserve.server", "--host", "0.0.0.0", "--grpc-port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without tokens" in result.stderr
    assert "Traceback" not in result.stderr


def test_outdated_schema_is_refused_naming_the_fix(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moduleserve.server",
            "--db",
            f"sqlite:///{tmp_path / 'empty.db'}",
            "--store",
            str(tmp_path / "store"),
            "--grpc-port",
            "0",
            "--no-metrics",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1
    assert "`moduleserve-registry init` creates one there" in result.stderr
    assert not (tmp_path / "empty.db").exists()


@pytest.mark.parametrize("frontend", ["grpc", "envoy"])
def test_workers_share_the_port_and_stop_together(
    demo_registry: Registry, tmp_path: Path, frontend: str
) -> None:
    import psutil

    port_file = tmp_path / "port"
    proc = start_server(demo_registry, port_file, "--workers", "2", "--frontend", frontend)
    port = int(port_file.read_text())
    deadline = time.monotonic() + 90
    children = psutil.Process(proc.pid).children()
    # The fine-tuning worker is the parent's alone. Serving: under grpc.aio the parent and
    # one more process; under Envoy, the parent supervises two Envoy processes.
    [job_worker] = [c for c in children if "moduleserve.server.jobs.worker" in c.cmdline()]
    servers = [c for c in children if c is not job_worker]
    assert len(servers) == (1 if frontend == "grpc" else 2)
    # Each binds the same port once it has started (SO_REUSEPORT).
    for worker in servers:
        while not any(c.laddr.port == port for c in worker.net_connections("tcp")):
            assert time.monotonic() < deadline and worker.is_running()
            time.sleep(0.1)
    answers = set()
    for _ in range(8):  # separate connections: the kernel spreads them over both processes
        with ModelClient(f"127.0.0.1:{port}") as client:
            answers.add(float(client.infer("doubler", np.array([1.0], np.float32))[0]))
    # Sharing is for its own workers only: another server on the port is refused.
    settings = demo_registry.settings
    outsider = subprocess.run(
        [
            *(sys.executable, "-m", "moduleserve.server", "--grpc-port", str(port), "--no-metrics"),
            *("--db", settings.database_url(), "--store", str(settings.store)),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert outsider.returncode == 1, outsider.stderr
    assert f"error: port {port} is in use (another server?)" in outsider.stderr
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert answers == {3.0}
    for child in (*servers, job_worker):
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert output.count("moduleserve serving on") == (2 if frontend == "grpc" else 1)


def test_a_killed_servers_processes_do_not_outlive_it(
    demo_registry: Registry, tmp_path: Path
) -> None:
    import psutil

    proc = start_server(demo_registry, tmp_path / "port")
    children = psutil.Process(proc.pid).children()
    [job_worker] = [c for c in children if "moduleserve.server.jobs.worker" in c.cmdline()]
    [envoy] = [c for c in children if c is not job_worker]
    assert "envoy" in envoy.name()

    proc.kill()  # no chance to stop its children
    proc.wait(timeout=30)

    for child in (envoy, job_worker):
        child.wait(timeout=15)  # raises TimeoutExpired if it lives on
        assert not child.is_running()


def test_a_crashed_envoy_stops_the_server_with_a_sentence(
    demo_registry: Registry, tmp_path: Path
) -> None:
    import psutil

    proc = start_server(demo_registry, tmp_path / "port", "--job-workers", "0")
    [envoy] = psutil.Process(proc.pid).children()
    envoy.kill()  # as the kernel's OOM killer would
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    assert f"error: Envoy (pid {envoy.pid}) exited with code -9" in output
