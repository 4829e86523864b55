"""Fine-tuning jobs and datasets: protobuf <-> registry entities, pure functions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.registry.entities import Dataset, Job, JobEvent
from moduleserve.registry.jobspec import JobSpec
from moduleserve.registry.uploads import DeclaredTensor

STATE_TO_PB = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}
KIND_TO_PB = {
    "state": pb.JOB_EVENT_KIND_STATE,
    "progress": pb.JOB_EVENT_KIND_PROGRESS,
    "epoch": pb.JOB_EVENT_KIND_EPOCH,
    "log": pb.JOB_EVENT_KIND_LOG,
}
# Fields whose proto3 zero is a real value, so the proto marks them `optional`.
_OPTIONAL_FIELDS = ("learning_rate", "epochs", "batch_size", "log_every_steps")
_PLAIN_FIELDS = (
    "max_steps",
    "weight_decay",
    "momentum",
    "grad_clip_norm",
    "warmup_steps",
    "seed",
    "val_split",
    "early_stopping_patience",
)
_CHOICE_FIELDS = ("optimizer", "loss", "schedule", "precision")
_EVENT_NUMBERS = ("epoch", "epochs", "step", "total_steps", "attempt")
_EVENT_FLOATS = ("learning_rate", "examples_per_second", "eta_seconds")


def spec_from_pb(message: pb.JobSpec) -> JobSpec:
    """The hyperparameters a request gives; what it leaves out takes JobSpec's defaults."""
    values: dict[str, Any] = {}
    for name in _OPTIONAL_FIELDS:
        if message.HasField(name):
            values[name] = getattr(message, name)
    for name in (*_PLAIN_FIELDS, *_CHOICE_FIELDS):
        value = getattr(message, name)
        if value:
            values[name] = value
    if message.freeze:
        values["freeze"] = tuple(message.freeze)
    return JobSpec.from_dict(values)


def spec_to_pb(spec: dict[str, Any]) -> pb.JobSpec:
    """A stored spec (JobSpec.to_dict) as its message."""
    return pb.JobSpec(**spec)


def states_from_pb(states: Any) -> list[str]:
    """Job state enums → names (UNSPECIFIED is ignored)."""
    return [STATE_FROM_PB[s] for s in states if s in STATE_FROM_PB]


def job_to_pb(job: Job) -> pb.Job:
    """A job with its epochs and latest progress."""
    message = pb.Job(
        id=job.id,
        model=job.model,
        base_version=job.base_version,
        dataset=job.dataset,
        spec=spec_to_pb(job.spec),
        state=STATE_TO_PB[job.state],
        created_at=_seconds(job.created_at),
        started_at=_seconds(job.started_at),
        finished_at=_seconds(job.finished_at),
        reason=job.reason,
        result_version=job.result_version or 0,
        alias=job.alias or "",
        alias_moved=job.alias_moved,
        attempts=job.attempts,
        worker=job.worker,
        best_epoch=job.best_epoch,
        cancel_requested=job.cancel_requested,
        created_by=job.created_by,
        metrics={k: float(v) for k, v in job.metrics.items() if isinstance(v, int | float)},
    )
    for epoch in job.epochs:
        message.epochs.add(
            epoch=epoch.epoch,
            train_loss=epoch.train_loss,
            checkpoint=True,
            finished_at=_seconds(epoch.finished_at),
            **({"val_loss": epoch.val_loss} if epoch.val_loss is not None else {}),
        )
    if job.progress is not None:
        message.progress.CopyFrom(event_to_pb(job.progress))
    return message


def event_to_pb(event: JobEvent) -> pb.JobEvent:
    """One stored event."""
    data = event.data
    message = pb.JobEvent(
        job_id=event.job_id,
        seq=event.seq,
        at=_seconds(event.at),
        kind=KIND_TO_PB.get(event.kind, pb.JOB_EVENT_KIND_UNSPECIFIED),
        state=STATE_TO_PB.get(data.get("state", ""), pb.JOB_STATE_UNSPECIFIED),
        message=str(data.get("message", "")),
    )
    for name in _EVENT_NUMBERS:
        setattr(message, name, int(data.get(name) or 0))
    for name in _EVENT_FLOATS:
        setattr(message, name, float(data.get(name) or 0.0))
    for name in ("loss", "val_loss"):
        if data.get(name) is not None:
            setattr(message, name, float(data[name]))
    return message


def dataset_to_pb(dataset: Dataset) -> pb.Dataset:
    """A registered dataset."""
    return pb.Dataset(
        name=dataset.name,
        digest=dataset.digest,
        size=dataset.size,
        description=dataset.description,
        created_at=_seconds(dataset.created_at),
        tensors=[
            pb.DatasetTensor(name=name, dtype=info["dtype"], shape=info["shape"])
            for name, info in sorted(dataset.tensors.items())
        ],
    )


def declared_from_pb(header: pb.UploadDatasetHeader) -> list[DeclaredTensor]:
    """The tensors an upload announces."""
    return [DeclaredTensor(t.name, t.dtype, tuple(t.shape)) for t in header.tensors]


def _seconds(when: datetime | None) -> float:
    return when.timestamp() if when is not None else 0.0
