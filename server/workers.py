"""Extra server processes sharing one port (SO_REUSEPORT): the kernel spreads connections.

Python serves one request at a time per process (the GIL), so on a machine with spare
cores more processes serve more requests. Each worker is a full server with its own
model cache; the first process binds the port (possibly ephemeral), then starts the
others on that port, forwards SIGTERM to them and waits for them on shutdown.

SO_REUSEPORT lets any process of the same user bind the port, so only a server started
with `--workers` > 1 sets it, after checking that the port is free, and only the workers
it starts (told by the hidden `--join-port` flag) skip that check.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Literal

logger = logging.getLogger(__name__)

PortMode = Literal["own", "share", "join"]
"""`own`: this process alone (no SO_REUSEPORT); `share`: the first of several processes
(checks the port, then sets SO_REUSEPORT); `join`: a worker on its parent's port."""

JOIN_FLAG = "--join-port"

# Flags the parent handles alone; workers get a fixed port, no metrics endpoint and no
# fine-tuning workers of their own (the parent's serve the whole registry).
PARENT_ONLY = {
    "--workers": 1,
    "--port-file": 1,
    "--grpc-port": 1,
    "--metrics-port": 1,
    "--no-metrics": 0,
    "--job-workers": 1,
    JOIN_FLAG: 0,
}


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """A `preexec_fn` for child processes: SIGTERM the child when this process dies, even
    by SIGKILL, so that no server or job worker lives on without its supervisor."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class PortInUseError(OSError):
    """Another process listens on the port this server was told to use."""

    def __init__(self, port: int, flag: str) -> None:
        super().__init__(f"port {port} is in use (another server?); pick another with {flag}")


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise PortInUseError when some process listens on `host:port` (0 is always free)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return  # an unknown host: the bind that follows names it
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR as the real bind sets it: a port in TIME_WAIT is free, a
            # listening one is not. No SO_REUSEPORT, so a sharing server refuses too.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(port, flag) from None
                # Anything else (no IPv6 here, an address not this machine's): the real
                # bind decides and reports it.


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
    return [*result, "--grpc-port", str(port), "--no-metrics", "--job-workers", "0", JOIN_FLAG]


def start_workers(count: int, argv: Sequence[str], port: int) -> list[subprocess.Popen[bytes]]:
    """Start `count` worker processes serving `port`."""
    args = [sys.executable, "-m", "moduleserve.server", *worker_argv(argv, port)]
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
