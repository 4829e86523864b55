"""Run one claimed job: build the base module (or resume from the job's last epoch), train it
with hooks that persist progress, epochs and checkpoints, and register the result.

Blobs are stored before the rows that point at them, and the result version is registered
in the same transaction that marks the job succeeded (`Jobs.succeed`), so a worker killed at
any point leaves no partial version: the job is taken again once its lease expires.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Mapping
from typing import Any

import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.entities import Job, JobEpoch
from moduleserve.registry.errors import RegistryError
from moduleserve.registry.formats import encode_tensors
from moduleserve.registry.jobs import JobResult
from moduleserve.registry.jobspec import JobSpec
from moduleserve.registry.orm import utcnow
from moduleserve.server.jobs.data import train_data_from
from moduleserve.server.jobs.lease import LeaseKeeper, Outcome, end_stopped
from moduleserve.server.jobs.training import EpochEnd, Progress, TrainResult, fine_tune

logger = logging.getLogger(__name__)


class JobHooks:
    """Training hooks that persist progress events and epoch checkpoints of one job."""

    def __init__(self, registry: Registry, job: Job, worker: str, keeper: LeaseKeeper) -> None:
        self._registry, self._job, self._worker, self._keeper = registry, job, worker, keeper

    def on_progress(self, progress: Progress) -> None:
        """Store a progress event."""
        self._registry.jobs.add_event(self._job.id, self._worker, "progress", _fields(progress))

    def on_epoch_end(self, end: EpochEnd) -> None:
        """Store the epoch's weights and resume state as blobs, then the epoch's row."""
        weights = encode_tensors(end.state_dict)
        digest = self._registry.blobs.put(weights)
        buffer = io.BytesIO()
        torch.save(end.resume_state, buffer)
        resume_digest = self._registry.blobs.put(buffer.getvalue())
        epoch = JobEpoch(
            epoch=end.epoch,
            train_loss=end.train_loss,
            val_loss=end.val_loss,
            digest=digest,
            size=len(weights),
            resume_digest=resume_digest,
            finished_at=utcnow(),
        )
        details = {"epochs": end.epochs, "step": end.step}
        self._registry.jobs.record_epoch(self._job.id, self._worker, epoch, end.is_best, details)

    def should_stop(self) -> bool:
        """Cancel asked, lease lost or worker stopping."""
        return self._keeper.stop_requested


def run_job(
    registry: Registry,
    job: Job,
    worker: str,
    device: torch.device,
    lease_s: float,
    shutdown: threading.Event,
) -> Outcome:
    """Train a claimed job to its end; every failure ends the job failed with its reason."""
    with LeaseKeeper(registry, job.id, worker, lease_s, shutdown) as keeper:
        try:
            result = _train(registry, job, worker, device, keeper)
            return _conclude(registry, job, worker, keeper, result)
        except Exception as exc:  # user code, data or the registry: the job fails, not the worker
            logger.warning("job %s failed: %s", job.id, exc, exc_info=True)
            reason = _reason(exc)
            registry.jobs.finish(job.id, worker, "failed", reason)
            return Outcome("failed", reason)


def _train(
    registry: Registry, job: Job, worker: str, device: torch.device, keeper: LeaseKeeper
) -> TrainResult:
    spec = JobSpec.from_dict(job.spec)
    base = registry.checkpoints.resolve(job.model, job.base_version)
    module_class = registry.module_class_of(base)
    data = train_data_from(registry.load_tensors(job.dataset_digest), module_class, spec)
    resume: Mapping[str, Any] | None = None
    last = job.epochs[-1] if job.epochs else None
    if last is not None and last.resume_digest:
        module = registry.build_with(module_class, registry.load_tensors(last.digest))
        resume = torch.load(io.BytesIO(registry.blobs.read(last.resume_digest)), weights_only=True)
        registry.jobs.add_event(
            job.id, worker, "log", {"message": f"resuming after epoch {last.epoch}"}
        )
    else:
        module = registry.build_version(base)
    hooks = JobHooks(registry, job, worker, keeper)
    return fine_tune(module.to(device), data, spec, device=device, hooks=hooks, resume=resume)


def _conclude(
    registry: Registry, job: Job, worker: str, keeper: LeaseKeeper, result: TrainResult
) -> Outcome:
    if keeper.stop_reason in ("lost", "shutdown"):
        return end_stopped(registry, job.id, worker, keeper.stop_reason)
    if result.cancelled:
        return end_stopped(registry, job.id, worker, "cancel")
    digest, size = _result_weights(registry, job, result)
    job_result = JobResult(
        digest=digest,
        size=size,
        class_name=registry.checkpoints.get_model(job.model).class_name,
        metrics=_metrics(result),
        best_epoch=result.best_epoch,
        description=f"fine-tuned from {job.model}:{job.base_version} on {job.dataset}",
    )
    ended = registry.jobs.succeed(job.id, worker, job_result)
    if ended is None:
        return Outcome("lost", "another worker holds the job now; nothing was registered")
    if ended.state == "cancelled":
        return Outcome("cancelled", "cancelled on request before its result was registered")
    return Outcome("succeeded", f"registered {ended.model}:{ended.result_version}")


def _result_weights(registry: Registry, job: Job, result: TrainResult) -> tuple[str, int]:
    """The blob to register: the best epoch's when early stopping ended the job (the epochs
    after it got worse), else the final weights."""
    spec = JobSpec.from_dict(job.spec)
    if spec.early_stopping_patience and result.best_epoch:
        kept = registry.jobs.epoch(job.id, result.best_epoch)
        return kept.digest, kept.size
    weights = encode_tensors(result.state_dict)
    return registry.blobs.put(weights), len(weights)


def _metrics(result: TrainResult) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "epochs": result.epochs_completed,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
    }
    optional = {
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "best_val_loss": result.best_val_loss,
    }
    metrics.update({k: v for k, v in optional.items() if v is not None})
    if result.best_epoch:
        metrics["best_epoch"] = result.best_epoch
    return metrics


def _fields(progress: Progress) -> dict[str, Any]:
    return {
        "epoch": progress.epoch,
        "epochs": progress.epochs,
        "step": progress.step,
        "total_steps": progress.total_steps,
        "loss": progress.loss,
        "learning_rate": progress.learning_rate,
        "examples_per_second": progress.examples_per_second,
        "eta_seconds": progress.eta_seconds,
    }


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, RegistryError) or name == "TrainingError":
        return text or name
    return f"{name}: {text}" if text else name
