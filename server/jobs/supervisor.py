"""The server's own fine-tuning workers: child processes it starts, restarts and stops.

Jobs never run in the server's process: a job that crashes (or is killed) takes down its
worker, not inference. Each worker runs `python -m moduleserve.server.jobs.worker` and gets
the server's settings one way only: every field of them, written to a private file that
MODULESERVE_WORKER_SETTINGS_FILE names (a new setting cannot be forgotten on the way).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moduleserve.server.config import JobWorkerSettings, ServerSettings
from moduleserve.server.jobs.worker import SETTINGS_FILE_ENV
from moduleserve.server.workers import die_with_parent

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0
MAX_RESTART_DELAY_S = 60.0
QUICK_EXIT_S = 10.0


def worker_environment() -> dict[str, str]:
    """The environment of a worker: the server's, with the server's import path."""
    env = dict(os.environ)
    # Whatever made the server's classes importable (its folder, PYTHONPATH) must hold
    # for the workers too.
    paths = [p for p in sys.path if p and not p.startswith((sys.prefix, sys.base_prefix))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))
    return env


def write_worker_settings(settings: JobWorkerSettings, path: Path) -> None:
    """Every field of the workers' settings, as JSON in a file only this user can read (the
    database URL may hold a password)."""
    fields = set(JobWorkerSettings.model_fields)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(settings.model_dump_json(include=fields))


class WorkerProcesses:
    """`count` worker processes kept running while the server runs."""

    def __init__(self, settings: ServerSettings, count: int) -> None:
        self._settings = settings
        self._env = worker_environment()
        self._folder: Path | None = None
        self._spawned = 0
        self._count = count
        self._grace = settings.shutdown_grace_s
        self._procs: list[subprocess.Popen[bytes]] = []
        self._started: list[float] = []
        self._delays: list[float] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [p.pid for p in self._procs if p.poll() is None]

    def start(self) -> None:
        """Start the workers and a task that restarts any that exits."""
        self._procs = [self._spawn() for _ in range(self._count)]
        self._started = [time.monotonic()] * self._count
        self._delays = [RESTART_DELAY_S] * self._count
        self._task = asyncio.get_running_loop().create_task(self._supervise())
        logger.info("started %d fine-tuning worker process(es)", self._count)

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The next worker's command line and environment, its settings file written (`stop`
        removes the files no worker read)."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="moduleserve-workers-"))  # mode 0700
        self._spawned += 1
        path = self._folder / f"settings-{self._spawned}.json"
        write_worker_settings(self._settings, path)
        args = [
            sys.executable,
            "-m",
            "moduleserve.server.jobs.worker",
            "--parent-pid",
            str(os.getpid()),
        ]
        return args, {**self._env, SETTINGS_FILE_ENV: str(path)}

    def _spawn(self) -> subprocess.Popen[bytes]:
        args, env = self.command()
        return subprocess.Popen(args, env=env, preexec_fn=die_with_parent)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(RESTART_DELAY_S)
            now = time.monotonic()
            for index, proc in enumerate(self._procs):
                code = proc.poll()
                if code is None or now - self._started[index] < self._delays[index]:
                    continue
                # A worker that keeps dying at start (a bad setting) is retried ever more slowly.
                quick = now - self._started[index] < QUICK_EXIT_S + self._delays[index]
                delay = min(self._delays[index] * 2, MAX_RESTART_DELAY_S)
                self._delays[index] = delay if quick else RESTART_DELAY_S
                logger.warning("job worker %d exited with %s; restarting it", proc.pid, code)
                self._procs[index] = self._spawn()
                self._started[index] = now

    async def stop(self) -> None:
        """SIGTERM the workers (each hands its running job back to the queue), then wait."""
        if self._task is not None:
            self._task.cancel()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(asyncio.to_thread(self._wait, p) for p in self._procs))
        if self._folder is not None:  # files of workers that died before reading theirs
            shutil.rmtree(self._folder, ignore_errors=True)

    def _wait(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=self._grace + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
