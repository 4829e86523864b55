"""The server's own fine-tuning workers: child processes it starts, restarts and stops.

Jobs never run in the server's process: a job that crashes (or is killed) takes down its
worker, not inference. The workers inherit the server's registry settings through
MODULESERVE_* variables and run `python -m moduleserve.server.jobs.worker`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

from moduleserve.server.config import ServerSettings
from moduleserve.server.workers import die_with_parent

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0
MAX_RESTART_DELAY_S = 60.0
QUICK_EXIT_S = 10.0


def worker_environment(settings: ServerSettings) -> dict[str, str]:
    """The environment of a worker: the server's registry and job settings."""
    env = dict(os.environ)
    env.update(
        {
            "MODULESERVE_DB": settings.database_url(),
            "MODULESERVE_STORE": str(settings.store.resolve()),
            "MODULESERVE_ALLOWED_CLASS_PREFIXES": json.dumps(settings.allowed_class_prefixes),
            "MODULESERVE_CLASS_PATH": json.dumps([str(p.resolve()) for p in settings.class_path]),
            "MODULESERVE_DEFAULT_ALIAS": settings.default_alias,
            "MODULESERVE_JOB_DEVICE": settings.job_device,
            "MODULESERVE_JOB_TORCH_THREADS": str(settings.job_torch_threads),
            "MODULESERVE_JOB_NICE": str(settings.job_nice),
            "MODULESERVE_JOB_LEASE_S": str(settings.job_lease_s),
            "MODULESERVE_JOB_POLL_S": str(settings.job_poll_s),
            "MODULESERVE_JOB_MAX_ATTEMPTS": str(settings.job_max_attempts),
            "MODULESERVE_LOG_FORMAT": settings.log_format,
            "MODULESERVE_LOG_LEVEL": settings.log_level,
        }
    )
    # Whatever made the server's classes importable (its folder, PYTHONPATH) must hold
    # for the workers too.
    paths = [p for p in sys.path if p and not p.startswith((sys.prefix, sys.base_prefix))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))
    return env


class WorkerProcesses:
    """`count` worker processes kept running while the server runs."""

    def __init__(self, settings: ServerSettings, count: int) -> None:
        self._env = worker_environment(settings)
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

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [
            sys.executable,
            "-m",
            "moduleserve.server.jobs.worker",
            "--parent-pid",
            str(os.getpid()),
        ]
        return subprocess.Popen(args, env=self._env, preexec_fn=die_with_parent)

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

    def _wait(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=self._grace + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
