"""Child processes of a benchmark: start and stop them, and measure their CPU and memory."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


class ProcessGroup:
    """A server process and its children, for CPU (% of one core) and RSS over a window."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.processes: list[psutil.Process] = []
        self.refresh()
        self._cpu0 = self._wall0 = 0.0

    def refresh(self) -> None:
        """Re-read the tree: a supervisor may have started children since (Envoy, job workers)."""
        try:
            self.processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            self.processes = []

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the group so far."""
        total = 0.0
        for proc in self.processes:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def rss_mib(self, only: str = "") -> float:
        """Resident memory of the whole tree now (of the processes whose command line
        contains ``only``, when given)."""
        self.refresh()
        total = 0
        for proc in self.processes:
            try:
                if only and only not in " ".join(proc.cmdline()):
                    continue
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / MIB

    def start(self) -> None:
        """Begin a CPU window (over the processes alive now)."""
        self.refresh()
        self._cpu0, self._wall0 = self.cpu_seconds(), time.perf_counter()

    def cpu_pct(self) -> float:
        """CPU since `start`, in % of one core."""
        return 100.0 * (self.cpu_seconds() - self._cpu0) / (time.perf_counter() - self._wall0)


def machine_busy_s() -> float:
    """CPU seconds all cores spent running anything since boot (guest time is inside user)."""
    times = psutil.cpu_times()
    return sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def wait_quiet(max_wait_s: float, busy_pct: float = 25.0, window_s: float = 2.0) -> float:
    """Wait (up to ``max_wait_s``) until the machine is under ``busy_pct`` for ``window_s``;
    return the last measured busy percentage (of one core)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        start = machine_busy_s()
        time.sleep(window_s)
        busy = 100.0 * (machine_busy_s() - start) / window_s
        if busy < busy_pct or time.monotonic() >= deadline:
            return busy


def wait_for_port(port_file: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The port the process wrote, or None when it exited or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def parse_cpus(text: str) -> set[int]:
    """``taskset -c`` style CPU list ("0", "1-3", "0,2") as a set; empty text: no pinning."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pinned(cmd: list[str], cpus: set[int] | frozenset[int]) -> list[str]:
    """``cmd`` under ``taskset -c`` (it and its descendants on ``cpus``); unchanged when
    ``cpus`` is empty. taskset execs the command, so the pid is the command's. (Not a
    ``preexec_fn``: that forces fork(), whose handlers disturb grpc in this process.)"""
    if not cpus:
        return cmd
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *cmd]


@contextmanager
def started(
    cmd: list[str],
    port_file: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    cpus: set[int] | frozenset[int] = frozenset(),
) -> Iterator[tuple[int, int, float]]:
    """Run ``cmd`` (on ``cpus`` when given) with output to ``log_path``; yield (pid, port,
    start-up seconds)."""
    port_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            pinned(cmd, cpus),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        try:
            port = wait_for_port(port_file, proc, 60.0)
            if port is None:
                raise ServerStartError(f"{shlex.join(cmd)}\nfailed to start:\n{log_tail(log_path)}")
            yield proc.pid, port, time.perf_counter() - start
        finally:
            stop_process(proc)


class ServerStartError(RuntimeError):
    """A server process exited or did not write its port file in time."""
