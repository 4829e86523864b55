"""`moduleserve-worker`: a process that claims fine-tuning jobs from the registry and runs them.

It runs at a lower CPU priority and with its own torch thread count, so that a server on
the same machine keeps its inference latency while a job trains. SIGTERM or SIGINT hands
the running job back to the queue (another worker resumes it from its last epoch) and exits.

An idle worker has not imported torch: it loads torch and the training code when it claims
its first job (see `Training`), so a server's worker that never trains costs the memory of a
database client (about 70 MiB RSS here, `python -m bench.worker_idle`) instead of torch's
(about 345 MiB). Only a `--device` other than `auto` or `cpu` imports torch at start, to check
that the machine has it.
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
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from moduleserve.client.version import version_text
from moduleserve.registry.api import Registry
from moduleserve.registry.config import with_added
from moduleserve.registry.entities import Job
from moduleserve.registry.errors import RegistryError
from moduleserve.server.config import JobWorkerSettings, WorkerSettings, settings_error_text
from moduleserve.server.jobs.lease import LeaseKeeper, Outcome, end_stopped
from moduleserve.server.logs import configure_logging

if TYPE_CHECKING:  # imported on the first claim (`Training.load`), never by an idle worker
    import torch

logger = logging.getLogger("moduleserve.server.jobs.worker")  # also when run as __main__

SETTINGS_FILE_ENV = "MODULESERVE_WORKER_SETTINGS_FILE"
"""Names the file of settings a server writes for each worker it starts (see `load_settings`)."""


def run_worker(settings: WorkerSettings, shutdown: threading.Event) -> None:
    """Claim and run jobs until `shutdown` is set."""
    os.nice(settings.job_nice)
    training = Training(settings)
    registry = Registry(settings)
    registry.check_schema()
    worker = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    logger.info(
        "worker %s ready: device %s, %d torch thread(s), nice +%d, registry %s",
        worker,
        settings.job_device,
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
                outcome = training.load_holding(registry, job, worker, shutdown)
                if outcome is None:
                    outcome = training.run(registry, job, worker, shutdown)
            except TrainingUnavailable:
                raise  # the worker cannot train at all: stop (a server restarts it later)
            except Exception:  # e.g. the database went away while failing the job
                logger.exception("job %s: could not be ended; its lease will expire", job.id)
                continue
            logger.info("job %s %s: %s", job.id, outcome.state, outcome.detail)
    finally:
        registry.close()


class TrainingUnavailable(RuntimeError):
    """torch or the training code could not be imported or set up in this worker."""


class Training:
    """torch and the training code, imported when the worker claims its first job rather
    than at start: most workers idle most of the time, and torch is most of a worker's
    memory."""

    def __init__(self, settings: JobWorkerSettings) -> None:
        self._settings = settings
        self._device: torch.device | None = None

    def load_holding(
        self, registry: Registry, job: Job, worker: str, shutdown: threading.Event
    ) -> Outcome | None:
        """Load (the first time), holding the claimed `job` meanwhile: the import takes
        seconds, longer than a short lease, and a cancel or a shutdown must not wait for it.
        None when the job is still to run; else how it ended while torch loaded. A worker
        that cannot load hands the job back and raises TrainingUnavailable."""
        if self._device is not None:
            return None
        failure: list[BaseException] = []

        def load() -> None:
            try:
                self._load()
            except BaseException as exc:  # re-raised in the worker's thread below
                failure.append(exc)

        loader = threading.Thread(target=load, name="load-training", daemon=True)
        with LeaseKeeper(registry, job.id, worker, self._settings.job_lease_s, shutdown) as keeper:
            loader.start()
            while loader.is_alive() and keeper.stop_reason is None:
                loader.join(0.1)
            stopped = keeper.stop_reason
            # The job ends at once; the import still finishes (it cannot be interrupted).
            outcome = None if stopped is None else end_stopped(registry, job.id, worker, stopped)
        loader.join()
        if failure:
            if outcome is None:
                registry.jobs.release(job.id, worker, f"{worker} could not load torch")
            raise TrainingUnavailable(f"cannot load torch: {failure[0]}") from failure[0]
        return outcome

    def _load(self) -> None:
        import torch

        from moduleserve.server.engine.devices import resolve_device
        from moduleserve.server.jobs import runner  # noqa: F401  (imported here, not mid-job)

        torch.set_num_threads(self._settings.job_torch_threads)
        _warm_up_optimizers()
        self._device = resolve_device(self._settings.job_device)
        logger.info(
            "training code loaded: device %s, %d torch thread(s)",
            self._device,
            self._settings.job_torch_threads,
        )

    def run(self, registry: Registry, job: Job, worker: str, shutdown: threading.Event) -> Outcome:
        """Train a claimed job to its end (after `load_holding`)."""
        from moduleserve.server.jobs.runner import run_job

        assert self._device is not None, "load_holding first"
        return run_job(registry, job, worker, self._device, self._settings.job_lease_s, shutdown)


def _warm_up_optimizers() -> None:
    """Build one optimizer before the first job trains: torch imports its compiler stack on
    first use (1-2 s here), which would otherwise count in the first epoch's examples/s."""
    import torch

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).zero_grad()


def check_device(setting: str) -> None:
    """Refuse at start a `--device` this machine lacks (ValueError). `auto` and `cpu` exist
    everywhere and are taken without importing torch; any other setting imports it to ask."""
    if setting in ("auto", "cpu"):
        return
    from moduleserve.server.engine.devices import resolve_device

    resolve_device(setting)


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


def load_settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings. A server's worker reads the file SETTINGS_FILE_ENV names: the
    server's own settings, every field of them (so none can be forgotten on the way), in a
    file only this user can read, removed once read. A worker started by hand takes its
    flags over MODULESERVE_* variables over moduleserve.toml.

    Raises ValueError or ValidationError for settings that are not valid."""
    named = os.environ.get(SETTINGS_FILE_ENV)
    if named:
        path = Path(named)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the settings file {path}: {exc.strerror}") from None
        path.unlink(missing_ok=True)  # it was written for this process alone
        return WorkerSettings.model_validate_json(text)
    flags: dict[str, Any] = {
        k: v for k, v in vars(args).items() if v is not None and k != "parent_pid"
    }
    prefixes = flags.pop("allowed_class_prefixes", ())
    class_path = [Path(p) for p in flags.pop("class_path", ())]
    return with_added(WorkerSettings(**flags), prefixes, class_path)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, then work until SIGTERM/SIGINT."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
        check_device(settings.job_device)
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
    except (RegistryError, TrainingUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
