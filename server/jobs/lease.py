"""A claimed job's lease, renewed from a thread, and the reason its training must stop.

No torch here: a worker keeps the lease of the job it just claimed while it imports torch and
the training code (the first job only), which takes longer than a short lease.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from moduleserve.registry.api import Registry

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the job's lease from a thread and tells the training loop when to stop:
    cancel requested, lease lost to another worker, or the worker shutting down."""

    def __init__(
        self,
        registry: Registry,
        job_id: str,
        worker: str,
        lease_s: float,
        shutdown: threading.Event,
    ) -> None:
        self._jobs, self._job_id, self._worker = registry.jobs, job_id, worker
        self._lease_s, self._shutdown = lease_s, shutdown
        # Cancel must stop a job within 2 s: look at least twice a second.
        self._interval = min(0.5, lease_s / 3)
        self._done = threading.Event()
        self.stop_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def stop_requested(self) -> bool:
        """Whether training should stop now."""
        return self.stop_reason is not None

    def _run(self) -> None:
        renewed = time.monotonic()
        while not self._done.wait(self._interval):
            if self._shutdown.is_set() and self.stop_reason is None:
                self.stop_reason = "shutdown"  # the worker is stopping: hand the job back
            try:
                lease = self._jobs.renew(self._job_id, self._worker, self._lease_s)
            except Exception as exc:  # the database is briefly unreachable: keep trying
                logger.warning("job %s: lease renewal failed (%s)", self._job_id, exc)
                if time.monotonic() - renewed > self._lease_s:
                    self.stop_reason = "lost"  # another worker may hold it by now
                continue
            renewed = time.monotonic()
            if not lease.held:
                self.stop_reason = "lost"
            elif lease.cancel_requested and self.stop_reason is None:
                self.stop_reason = "cancel"


@dataclass(frozen=True)
class Outcome:
    """How a run ended, for the worker's log."""

    state: str
    detail: str


def end_stopped(registry: Registry, job_id: str, worker: str, stop_reason: str) -> Outcome:
    """End a job whose training stopped (or never started) for `stop_reason`, a
    `LeaseKeeper.stop_reason`: cancelled, handed back to the queue, or left to the worker
    that holds it now."""
    if stop_reason == "lost":
        return Outcome("lost", "another worker holds the job now; nothing was registered")
    if stop_reason == "shutdown":
        registry.jobs.release(job_id, worker, f"{worker} stopped; the job waits for a worker")
        return Outcome("queued", "handed back to the queue")
    registry.jobs.finish(job_id, worker, "cancelled", "cancelled on request")
    return Outcome("cancelled", "cancelled on request")
