"""`JobsClient`: fine-tuning jobs and datasets over the `moduleserve.v1.Jobs`/`Datasets` services.

    from moduleserve.client.client import ModelClient

    with ModelClient("127.0.0.1:8001", token="...") as client:
        client.upload_dataset("pairs", {"inputs": x, "targets": y})
        job = client.jobs.create("mlp", "1", dataset="pairs", epochs=3, learning_rate=1e-3)
        for event in client.jobs.watch(job.id):     # replays, then streams until the job ends
            print(event.kind, event.step, event.loss)
        print(client.jobs.get(job.id).result_version)

Results are frozen dataclasses with `to_dict()` for JSON. torch is optional: it is imported
only when a torch tensor is uploaded.
"""

from __future__ import annotations

import builtins
import getpass
import socket
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from moduleserve.client.client import translate_errors
from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.client.pb import moduleserve_v1_pb2_grpc as pb_grpc
from moduleserve.client.tables import ToDict

Metadata = Sequence[tuple[str, str]]

STATE_NAMES: dict[pb.JobState, str] = {
    pb.JOB_STATE_UNSPECIFIED: "",
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
}
STATES_BY_NAME = {name: value for value, name in STATE_NAMES.items() if name}
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})
KIND_NAMES: dict[pb.JobEventKind, str] = {
    pb.JOB_EVENT_KIND_UNSPECIFIED: "",
    pb.JOB_EVENT_KIND_STATE: "state",
    pb.JOB_EVENT_KIND_PROGRESS: "progress",
    pb.JOB_EVENT_KIND_EPOCH: "epoch",
    pb.JOB_EVENT_KIND_LOG: "log",
}
# The keyword names `create` accepts are exactly the JobSpec fields, so the two cannot drift.
HYPERPARAMETERS = tuple(f.name for f in pb.JobSpec.DESCRIPTOR.fields)
# numpy dtype -> torch name on the wire; numpy has no bfloat16 (pass a torch tensor for it).
WIRE_NAMES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
WIRE_DTYPES: dict[np.dtype, str] = {np.dtype(name): name for name in WIRE_NAMES}
DEFAULT_CHUNK_BYTES = 512 * 1024


@dataclass(frozen=True)
class EpochInfo(ToDict):
    """What one epoch left behind; `checkpoint`: PromoteJob can register it."""

    epoch: int
    train_loss: float
    val_loss: float | None
    checkpoint: bool
    finished_at: float


@dataclass(frozen=True)
class JobEventInfo(ToDict):
    """One stored job event; `kind` is "state", "progress", "epoch" or "log"."""

    job_id: str
    seq: int
    at: float
    kind: str
    state: str  # "" unless a state event
    message: str
    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float | None
    val_loss: float | None
    learning_rate: float
    examples_per_second: float
    eta_seconds: float
    attempt: int


@dataclass(frozen=True)
class JobInfo(ToDict):
    """A fine-tuning job; times are Unix seconds, None while not reached."""

    id: str
    model: str
    base_version: int
    dataset: str
    spec: dict[str, Any]  # hyperparameters; optional ones the server left unset are absent
    state: str  # queued, running, succeeded, failed, cancelled
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    reason: str
    result_version: int | None
    alias: str
    alias_moved: bool
    attempts: int
    worker: str
    epochs: tuple[EpochInfo, ...]
    best_epoch: int  # 0 without validation
    progress: JobEventInfo | None
    cancel_requested: bool
    metrics: dict[str, float]
    created_by: str


@dataclass(frozen=True)
class DatasetInfo(ToDict):
    """A registered dataset; `tensors` maps each name to {"dtype": ..., "shape": [...]}."""

    name: str
    digest: str
    size: int
    tensors: dict[str, dict[str, Any]]
    description: str
    created_at: float | None


@dataclass(frozen=True)
class WireTensor:
    """One tensor ready to upload: torch dtype name, shape, and its little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # flat, format "B"


class JobsClient:
    """Synchronous calls to the `moduleserve.v1.Jobs` and `Datasets` services over a channel."""

    def __init__(
        self, channel: grpc.Channel, metadata: Metadata = (), timeout: float | None = 60.0
    ) -> None:
        self._jobs = pb_grpc.JobsStub(channel)  # type: ignore[no-untyped-call]  # generated
        self._datasets = pb_grpc.DatasetsStub(channel)  # type: ignore[no-untyped-call]  # generated
        # Who starts or cancels a job is recorded with it (no authentication: a label).
        self._metadata = (*tuple(metadata), ("x-moduleserve-user", _user()))
        self.timeout = timeout

    def create(
        self,
        model: str,
        version: str = "",
        *,
        dataset: str,
        alias: str = "",
        **hyperparameters: Any,
    ) -> JobInfo:
        """Validate and queue a job on `model:version` (version number, alias or "" default).

        Keywords are JobSpec fields (epochs=3, learning_rate=1e-3, freeze=["fc1.*"], ...);
        those not given (or None) take the server's defaults.
        """
        request = pb.CreateJobRequest(
            base=pb.ModelRef(model=model, version=str(version)),
            dataset=dataset,
            spec=spec_to_pb(hyperparameters),
            alias=alias,
        )
        return job_from_pb(self._call(self._jobs.CreateJob, request).job)

    def get(self, job_id: str) -> JobInfo:
        """One job with its per-epoch results and latest progress."""
        return job_from_pb(self._call(self._jobs.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def list(self, model: str = "", states: Iterable[str] = (), limit: int = 0) -> list[JobInfo]:
        """Jobs, newest first, optionally of one model or in some states (0: server's limit)."""
        request = pb.ListJobsRequest(model=model, states=_state_values(states), limit=limit)
        return [job_from_pb(job) for job in self._call(self._jobs.ListJobs, request).jobs]

    def watch(self, job_id: str, after_seq: int = 0) -> Generator[JobEventInfo, None, None]:
        """Replay the events after `after_seq`, then stream new ones until the job ends.

        The stream has no deadline. Closing the iterator (or an exception such as
        KeyboardInterrupt while it waits) cancels the RPC; the job itself keeps running.
        """
        request = pb.WatchJobRequest(job_id=job_id, after_seq=after_seq)
        call = self._jobs.WatchJob(request, metadata=self._metadata)
        try:
            with translate_errors():
                for message in call:
                    yield event_from_pb(message)
        finally:
            call.cancel()  # a no-op once the stream has ended

    def events(
        self, job_id: str, after_seq: int = 0, limit: int = 0
    ) -> builtins.list[JobEventInfo]:
        """The job's stored events after `after_seq` (at most `limit`, 0: all), without waiting."""
        request = pb.ListJobEventsRequest(job_id=job_id, after_seq=after_seq, limit=limit)
        return [event_from_pb(e) for e in self._call(self._jobs.ListJobEvents, request).events]

    def cancel(self, job_id: str) -> JobInfo:
        """Ask a job to stop; returns it as it is right after the request."""
        reply = self._call(self._jobs.CancelJob, pb.CancelJobRequest(job_id=job_id))
        return job_from_pb(reply.job)

    def promote(self, job_id: str, epoch: int = 0, alias: str = "") -> tuple[str, int, int]:
        """Register the checkpoint kept at `epoch` (0: best, else last); returns (model,
        version, the epoch taken)."""
        request = pb.PromoteJobRequest(job_id=job_id, epoch=epoch, alias=alias)
        reply = self._call(self._jobs.PromoteJob, request)
        return reply.version.model, reply.version.version, reply.epoch

    def upload_dataset(
        self,
        name: str,
        tensors: Mapping[str, Any],
        description: str = "",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> DatasetInfo:
        """Register named numpy arrays or torch tensors as a dataset, streamed in chunks.

        The upload has no deadline, since its duration grows with the data.
        """
        wire = prepare_tensors(tensors)  # before the RPC: errors here are the caller's
        requests = upload_requests(name, wire, description, chunk_bytes)
        with translate_errors():
            reply = self._datasets.UploadDataset(requests, metadata=self._metadata)
        return dataset_from_pb(reply.dataset)

    def datasets(self) -> builtins.list[DatasetInfo]:
        """Every registered dataset."""
        reply = self._call(self._datasets.ListDatasets, pb.ListDatasetsRequest())
        return [dataset_from_pb(d) for d in reply.datasets]

    def _call(self, method: Any, request: Any) -> Any:
        with translate_errors():
            return method(request, timeout=self.timeout, metadata=self._metadata)


def spec_to_pb(hyperparameters: Mapping[str, Any]) -> pb.JobSpec:
    """A JobSpec with only the given fields set; an unknown name is a ValueError naming it."""
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
    if unknown:
        known = ", ".join(HYPERPARAMETERS)
        raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)}; known: {known}")
    spec = pb.JobSpec()
    for name, value in hyperparameters.items():
        if value is None:
            continue
        try:
            if name == "freeze":
                spec.freeze.extend([value] if isinstance(value, str) else value)
            else:
                setattr(spec, name, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"hyperparameter {name}: {exc}") from None
    return spec


def spec_from_pb(message: pb.JobSpec) -> dict[str, Any]:
    """The hyperparameters as a dict; unset optional fields are left out."""
    spec: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        spec[field.name] = list(value) if field.name == "freeze" else value
    return spec


def epoch_from_pb(message: pb.JobEpoch) -> EpochInfo:
    """EpochInfo from its message."""
    return EpochInfo(
        epoch=message.epoch,
        train_loss=message.train_loss,
        val_loss=message.val_loss if message.HasField("val_loss") else None,
        checkpoint=message.checkpoint,
        finished_at=message.finished_at,
    )


def event_from_pb(message: pb.JobEvent) -> JobEventInfo:
    """JobEventInfo from its message; unset losses become None."""
    return JobEventInfo(
        job_id=message.job_id,
        seq=message.seq,
        at=message.at,
        kind=KIND_NAMES.get(message.kind, ""),
        state=STATE_NAMES.get(message.state, ""),
        message=message.message,
        epoch=message.epoch,
        epochs=message.epochs,
        step=message.step,
        total_steps=message.total_steps,
        loss=message.loss if message.HasField("loss") else None,
        val_loss=message.val_loss if message.HasField("val_loss") else None,
        learning_rate=message.learning_rate,
        examples_per_second=message.examples_per_second,
        eta_seconds=message.eta_seconds,
        attempt=message.attempt,
    )


def job_from_pb(message: pb.Job) -> JobInfo:
    """JobInfo from its message; zero times and result version become None."""
    return JobInfo(
        id=message.id,
        model=message.model,
        base_version=message.base_version,
        dataset=message.dataset,
        spec=spec_from_pb(message.spec),
        state=STATE_NAMES.get(message.state, ""),
        created_at=message.created_at or None,
        started_at=message.started_at or None,
        finished_at=message.finished_at or None,
        reason=message.reason,
        result_version=message.result_version or None,
        alias=message.alias,
        alias_moved=message.alias_moved,
        attempts=message.attempts,
        worker=message.worker,
        epochs=tuple(epoch_from_pb(e) for e in message.epochs),
        best_epoch=message.best_epoch,
        progress=event_from_pb(message.progress) if message.HasField("progress") else None,
        cancel_requested=message.cancel_requested,
        metrics=dict(message.metrics),
        created_by=message.created_by,
    )


def dataset_from_pb(message: pb.Dataset) -> DatasetInfo:
    """DatasetInfo from its message."""
    return DatasetInfo(
        name=message.name,
        digest=message.digest,
        size=message.size,
        tensors={t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in message.tensors},
        description=message.description,
        created_at=message.created_at or None,
    )


def prepare_tensors(tensors: Mapping[str, Any]) -> list[WireTensor]:
    """Each numpy array or torch tensor as C-contiguous little-endian bytes with its wire dtype."""
    if not tensors:
        raise ValueError("a dataset needs at least one tensor")
    return [_wire_tensor(str(name), value) for name, value in tensors.items()]


def upload_requests(
    name: str,
    tensors: Sequence[WireTensor],
    description: str = "",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.UploadDatasetRequest]:
    """The UploadDataset stream: a header, then each tensor's bytes in chunks of <= chunk_bytes."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    header = pb.UploadDatasetHeader(
        name=name,
        description=description,
        tensors=[pb.DatasetTensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in tensors],
    )
    yield pb.UploadDatasetRequest(header=header)
    for tensor in tensors:
        for start in range(0, len(tensor.data), chunk_bytes):
            # One chunk-sized copy at a time: the whole dataset is never one bytes object.
            yield pb.UploadDatasetRequest(chunk=bytes(tensor.data[start : start + chunk_bytes]))


def _wire_tensor(name: str, value: Any) -> WireTensor:
    if type(value).__module__.startswith("torch"):
        dtype, array = _torch_array(name, value)
    else:
        array = np.asarray(value)
        dtype = WIRE_DTYPES.get(array.dtype.newbyteorder("="), "")
        if not dtype:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be uploaded")
    little = np.require(array, dtype=array.dtype.newbyteorder("<"), requirements="C")
    return WireTensor(name, dtype, tuple(array.shape), little.reshape(-1).view(np.uint8).data)


def _torch_array(name: str, tensor: Any) -> tuple[str, np.ndarray]:
    """The torch dtype name and a numpy view of the tensor's elements (bfloat16 as int16 bits)."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in (*WIRE_NAMES, "bfloat16"):
        raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be uploaded")
    import torch  # already imported by whoever made the tensor

    tensor = tensor.detach().cpu().contiguous()
    if dtype == "bfloat16":  # numpy has no bfloat16; int16 has the same size and bytes
        tensor = tensor.view(torch.int16)
    array: np.ndarray = tensor.numpy()
    return dtype, array


def _state_values(states: Iterable[str]) -> list[pb.JobState]:
    values = []
    for state in states:
        value = STATES_BY_NAME.get(state.lower())
        if value is None:
            raise ValueError(f"unknown job state {state!r}: use {', '.join(STATES_BY_NAME)}")
        values.append(value)
    return values


def _user() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return "unknown"
