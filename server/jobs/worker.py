"""`moduleserve-worker`: a process that claims fine-tuning jobs from the registry and runs them.

It runs at a lower CPU priority and with its own torch thread count, so that a server on
the same machine keeps its inference latency while a job trains. SIGTERM or SIGINT hands
the running job back to the queue (another worker resumes it from its last epoch) and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from moduleserve.client.tables import version_text
from moduleserve.registry.api import Registry
from moduleserve.registry.config import with_added
from moduleserve.registry.errors import RegistryError
from moduleserve.server.config import WorkerSettings, settings_error_text
from moduleserve.server.engine.devices import resolve_device
from moduleserve.server.jobs.runner import run_job
from moduleserve.server.logs import configure_logging

logger = logging.getLogger("moduleserve.server.jobs.worker")  # also when run as __main__


def run_worker(settings: WorkerSettings, shutdown: threading.Event) -> None:
    """Claim and run jobs until `shutdown` is set."""
    os.nice(settings.job_nice)
    torch.set_num_threads(settings.job_torch_threads)
    _warm_up_optimizers()
    device = resolve_device(settings.job_device)
    registry = Registry(settings)
    registry.check_schema()
    worker = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    logger.info(
        "worker %s ready: device %s, %d torch thread(s), nice +%d, registry %s",
        worker,
        device,
        settings.job_torch_threads,
        settings.job_nice,
        registry.db.engine.url.render_as_string(hide_password=True),
    )
    try:
        while not shutdown.is_set():
            try:
                job = registry.jobs.claim(worker, settings.job_lease_s, settings.job_max_attempts)
            except RegistryError as exc:
                logger.warning("cannot claim jobs: %s", exc)
                job = None
            if job is None:
                shutdown.wait(settings.job_poll_s)
                continue
            logger.info(
                "job %s: %s:%d on dataset %s (attempt %d)",
                job.id,
                job.model,
                job.base_version,
                job.dataset,
                job.attempts,
            )
            try:
                outcome = run_job(registry, job, worker, device, settings.job_lease_s, shutdown)
            except Exception:  # e.g. the database went away while failing the job
                logger.exception("job %s: could not be ended; its lease will expire", job.id)
                continue
            logger.info("job %s %s: %s", job.id, outcome.state, outcome.detail)
    finally:
        registry.close()


def _warm_up_optimizers() -> None:
    """Build one optimizer before the first job: torch imports its compiler stack on first
    use (1-2 s here), which would otherwise count against the first job's running time."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).zero_grad()


def exit_with_parent(
    parent: int, shutdown: threading.Event, poll_s: float = 1.0
) -> threading.Thread:
    """Set `shutdown` once process `parent` is no longer this one's parent (a server's own
    worker must not outlive a server that was killed, even while it was still starting)."""

    def watch() -> None:
        while os.getppid() == parent:
            if shutdown.wait(poll_s):
                return
        logger.warning("the server that started this worker is gone; stopping")
        shutdown.set()

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def build_parser() -> argparse.ArgumentParser:
    """Every option; each also reads from a MODULESERVE_<NAME> environment variable."""
    p = argparse.ArgumentParser(
        prog="moduleserve-worker",
        description="Run fine-tuning jobs from a moduleserve registry (flags override "
        "MODULESERVE_* variables).",
    )
    add = p.add_argument
    add("--version", action="version", version=version_text())
    add("--db", help="registry database URL (default: sqlite file beside the store)")
    add("--store", help="registry blob store folder (default ./data/store)")
    add(
        "--allow-prefix",
        action="append",
        dest="allowed_class_prefixes",
        metavar="PACKAGE",
        help="package whose Module classes may be loaded, besides moduleserve.registry.demo "
        "(repeatable)",
    )
    add(
        "--class-path",
        action="append",
        dest="class_path",
        metavar="DIR",
        help="folder to import your classes' package from (repeatable)",
    )
    add("--device", dest="job_device", help="auto (default), cpu, cuda or cuda:N")
    add("--torch-threads", dest="job_torch_threads", type=int, help="default 1")
    add("--nice", dest="job_nice", type=int, help="CPU priority decrease, 0-19 (default 10)")
    add("--lease-s", dest="job_lease_s", type=float, help="job lease in seconds (default 30)")
    add("--poll-s", dest="job_poll_s", type=float, help="idle poll interval (default 1)")
    add("--max-attempts", dest="job_max_attempts", type=int, help="default 3")
    add("--worker-id", help="name recorded on jobs (default host:pid)")
    add(
        "--parent-pid",
        type=int,
        help="stop (handing the running job back) once this process is gone",
    )
    add("--log-format", choices=["plain", "json"])
    add("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, then work until SIGTERM/SIGINT."""
    args = build_parser().parse_args(argv)
    flags: dict[str, Any] = {
        k: v for k, v in vars(args).items() if v is not None and k != "parent_pid"
    }
    prefixes = flags.pop("allowed_class_prefixes", ())
    class_path = [Path(p) for p in flags.pop("class_path", ())]
    try:
        settings = with_added(WorkerSettings(**flags), prefixes, class_path)
        resolve_device(settings.job_device)
    except (ValidationError, ValueError) as exc:
        print(f"error: invalid settings: {settings_error_text(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    shutdown = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: shutdown.set())
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid, shutdown)
    try:
        run_worker(settings, shutdown)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
