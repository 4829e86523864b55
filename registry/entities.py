"""Frozen values the registry hands to callers (rows never leave the repositories)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype name and shape with -1 for free dimensions."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Inverse of `to_dict`."""
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class ModuleClass:
    """A registered Module class and how to build it."""

    name: str
    import_path: str
    kwargs: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    created_at: datetime


@dataclass(frozen=True)
class Version:
    """One checkpoint version of a model."""

    model: str
    version: int
    class_name: str
    digest: str
    size: int
    parent_version: int | None
    source: str
    description: str
    tags: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["aliases"] = list(self.aliases)
        return data


@dataclass(frozen=True)
class Model:
    """A model with its class, versions (oldest first) and aliases."""

    name: str
    class_name: str
    versions: tuple[int, ...]
    aliases: dict[str, int] = field(default_factory=dict)
    created_at: datetime | None = None

    @property
    def latest(self) -> int | None:
        """The highest existing version, if any."""
        return self.versions[-1] if self.versions else None


@dataclass(frozen=True)
class AliasEvent:
    """One recorded alias move."""

    model: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    at: datetime


@dataclass(frozen=True)
class Dataset:
    """A named set of tensors stored as one safetensors blob."""

    name: str
    digest: str
    size: int
    tensors: dict[str, Any]
    description: str
    created_at: datetime


@dataclass(frozen=True)
class BlobProblem:
    """One blob that `verify` found missing or corrupt, and who refers to it."""

    digest: str
    problem: str
    referenced_by: tuple[str, ...]


JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class JobEpoch:
    """What one epoch of a job left: losses and whether its checkpoint is kept."""

    epoch: int
    train_loss: float
    val_loss: float | None
    digest: str
    size: int
    resume_digest: str | None
    """Set for the newest epoch of a job that has not finished (what a resume needs)."""
    finished_at: datetime


@dataclass(frozen=True)
class JobEvent:
    """One stored job event; `data` holds the kind's fields (state, step, loss, …)."""

    job_id: str
    seq: int
    kind: str
    data: dict[str, Any]
    at: datetime


@dataclass(frozen=True)
class Job:
    """A fine-tuning job as stored, with its epochs and latest progress event."""

    id: str
    model: str
    base_version: int
    dataset: str
    dataset_digest: str
    spec: dict[str, Any]
    state: str
    alias: str | None
    alias_expect: int | None
    alias_moved: bool
    cancel_requested: bool
    reason: str
    attempts: int
    worker: str
    lease_until: datetime | None
    result_version: int | None
    metrics: dict[str, Any]
    best_epoch: int
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    epochs: tuple[JobEpoch, ...] = ()
    progress: JobEvent | None = None

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state."""
        return self.state in FINISHED_JOB_STATES
