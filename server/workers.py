"""Extra server processes sharing one port (SO_REUSEPORT): the kernel spreads connections.

Python serves one request at a time per process (the GIL), so on a machine with spare
cores more processes serve more requests. Each worker is a full server with its own
model cache; the first process binds the port (possibly ephemeral), then starts the
others on that port, forwards SIGTERM to them and waits for them on shutdown.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# Flags the parent handles alone; workers get a fixed port, no metrics endpoint and no
# fine-tuning workers of their own (the parent's serve the whole registry).
PARENT_ONLY = {
    "--workers": 1,
    "--port-file": 1,
    "--grpc-port": 1,
    "--metrics-port": 1,
    "--no-metrics": 0,
    "--job-workers": 1,
}


def worker_argv(argv: Sequence[str], port: int) -> list[str]:
    """The parent's command line, adjusted for a worker that shares `port`."""
    result: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in PARENT_ONLY:
            skip = PARENT_ONLY[name] if "=" not in arg else 0
            continue
        result.append(arg)
    return [*result, "--grpc-port", str(port), "--no-metrics", "--job-workers", "0"]


def start_workers(count: int, argv: Sequence[str], port: int) -> list[subprocess.Popen[bytes]]:
    """Start `count` worker processes serving `port`."""
    args = [sys.executable, "-m", "server", *worker_argv(argv, port)]
    workers = [subprocess.Popen(args) for _ in range(count)]
    logger.info("started %d extra worker process(es) on port %d", count, port)
    return workers


def stop_workers(workers: Sequence[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """SIGTERM every worker (they drain in-flight requests) and wait; returns exit codes."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(worker.wait())
    return codes
