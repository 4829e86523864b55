from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    TENSOR_KIND_PARAMETER: _ClassVar[TensorKind]
    TENSOR_KIND_BUFFER: _ClassVar[TensorKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class JobEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_EVENT_KIND_UNSPECIFIED: _ClassVar[JobEventKind]
    JOB_EVENT_KIND_STATE: _ClassVar[JobEventKind]
    JOB_EVENT_KIND_PROGRESS: _ClassVar[JobEventKind]
    JOB_EVENT_KIND_EPOCH: _ClassVar[JobEventKind]
    JOB_EVENT_KIND_LOG: _ClassVar[JobEventKind]
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_PARAMETER: TensorKind
TENSOR_KIND_BUFFER: TensorKind
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_EVENT_KIND_UNSPECIFIED: JobEventKind
JOB_EVENT_KIND_STATE: JobEventKind
JOB_EVENT_KIND_PROGRESS: JobEventKind
JOB_EVENT_KIND_EPOCH: JobEventKind
JOB_EVENT_KIND_LOG: JobEventKind

class ModelRef(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model", "version", "class_name", "loaded")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    class_name: str
    loaded: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., class_name: _Optional[str] = ..., loaded: _Optional[bool] = ...) -> None: ...

class ModuleNode(_message.Message):
    __slots__ = ("name", "depth", "class_name", "extra_repr", "parameters", "trainable", "frozen", "own_parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    EXTRA_REPR_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    OWN_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    depth: int
    class_name: str
    extra_repr: str
    parameters: int
    trainable: int
    frozen: int
    own_parameters: int
    def __init__(self, name: _Optional[str] = ..., depth: _Optional[int] = ..., class_name: _Optional[str] = ..., extra_repr: _Optional[str] = ..., parameters: _Optional[int] = ..., trainable: _Optional[int] = ..., frozen: _Optional[int] = ..., own_parameters: _Optional[int] = ...) -> None: ...

class Totals(_message.Message):
    __slots__ = ("parameters", "trainable", "frozen", "parameter_bytes", "parameter_tensors", "buffer_elements", "buffer_bytes", "buffer_tensors")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUFFER_TENSORS_FIELD_NUMBER: _ClassVar[int]
    parameters: int
    trainable: int
    frozen: int
    parameter_bytes: int
    parameter_tensors: int
    buffer_elements: int
    buffer_bytes: int
    buffer_tensors: int
    def __init__(self, parameters: _Optional[int] = ..., trainable: _Optional[int] = ..., frozen: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., parameter_tensors: _Optional[int] = ..., buffer_elements: _Optional[int] = ..., buffer_bytes: _Optional[int] = ..., buffer_tensors: _Optional[int] = ...) -> None: ...

class GetModuleTreeRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class GetModuleTreeResponse(_message.Message):
    __slots__ = ("model", "nodes", "totals", "text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    model: ModelVersion
    nodes: _containers.RepeatedCompositeFieldContainer[ModuleNode]
    totals: Totals
    text: str
    def __init__(self, model: _Optional[_Union[ModelVersion, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[ModuleNode, _Mapping]]] = ..., totals: _Optional[_Union[Totals, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class TensorStats(_message.Message):
    __slots__ = ("mean", "std", "min", "max", "norm", "zero_fraction", "finite", "nan_count", "inf_count")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    ZERO_FRACTION_FIELD_NUMBER: _ClassVar[int]
    FINITE_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    INF_COUNT_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    min: float
    max: float
    norm: float
    zero_fraction: float
    finite: int
    nan_count: int
    inf_count: int
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., norm: _Optional[float] = ..., zero_fraction: _Optional[float] = ..., finite: _Optional[int] = ..., nan_count: _Optional[int] = ..., inf_count: _Optional[int] = ...) -> None: ...

class TensorSummary(_message.Message):
    __slots__ = ("name", "kind", "shape", "dtype", "device", "numel", "requires_grad", "tied_to", "stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    TIED_TO_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: TensorKind
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    device: str
    numel: int
    requires_grad: bool
    tied_to: _containers.RepeatedScalarFieldContainer[str]
    stats: TensorStats
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., numel: _Optional[int] = ..., requires_grad: _Optional[bool] = ..., tied_to: _Optional[_Iterable[str]] = ..., stats: _Optional[_Union[TensorStats, _Mapping]] = ...) -> None: ...

class ListTensorsRequest(_message.Message):
    __slots__ = ("model", "kind", "pattern")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    kind: TensorKind
    pattern: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., pattern: _Optional[str] = ...) -> None: ...

class ListTensorsResponse(_message.Message):
    __slots__ = ("model", "tensors", "totals")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    model: ModelVersion
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSummary]
    totals: Totals
    def __init__(self, model: _Optional[_Union[ModelVersion, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorSummary, _Mapping]]] = ..., totals: _Optional[_Union[Totals, _Mapping]] = ...) -> None: ...

class GetTensorRequest(_message.Message):
    __slots__ = ("model", "name", "slices", "max_elements")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    MAX_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    name: str
    slices: str
    max_elements: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., name: _Optional[str] = ..., slices: _Optional[str] = ..., max_elements: _Optional[int] = ...) -> None: ...

class GetTensorResponse(_message.Message):
    __slots__ = ("model", "name", "dtype", "shape", "data")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    model: ModelVersion
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, model: _Optional[_Union[ModelVersion, _Mapping]] = ..., name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DiffVersionsRequest(_message.Message):
    __slots__ = ("base", "other")
    BASE_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    base: ModelRef
    other: ModelRef
    def __init__(self, base: _Optional[_Union[ModelRef, _Mapping]] = ..., other: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class DiffMetrics(_message.Message):
    __slots__ = ("changed_elements", "nonfinite_changed", "norm_base", "diff_norm", "relative_change", "max_abs_diff")
    CHANGED_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    NORM_BASE_FIELD_NUMBER: _ClassVar[int]
    DIFF_NORM_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    changed_elements: int
    nonfinite_changed: int
    norm_base: float
    diff_norm: float
    relative_change: float
    max_abs_diff: float
    def __init__(self, changed_elements: _Optional[int] = ..., nonfinite_changed: _Optional[int] = ..., norm_base: _Optional[float] = ..., diff_norm: _Optional[float] = ..., relative_change: _Optional[float] = ..., max_abs_diff: _Optional[float] = ...) -> None: ...

class TensorDiff(_message.Message):
    __slots__ = ("name", "kind", "shape_base", "shape_other", "dtype_base", "dtype_other", "shape_mismatch", "dtype_mismatch", "changed", "metrics")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_BASE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_OTHER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_BASE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_OTHER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: TensorKind
    shape_base: _containers.RepeatedScalarFieldContainer[int]
    shape_other: _containers.RepeatedScalarFieldContainer[int]
    dtype_base: str
    dtype_other: str
    shape_mismatch: bool
    dtype_mismatch: bool
    changed: bool
    metrics: DiffMetrics
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., shape_base: _Optional[_Iterable[int]] = ..., shape_other: _Optional[_Iterable[int]] = ..., dtype_base: _Optional[str] = ..., dtype_other: _Optional[str] = ..., shape_mismatch: _Optional[bool] = ..., dtype_mismatch: _Optional[bool] = ..., changed: _Optional[bool] = ..., metrics: _Optional[_Union[DiffMetrics, _Mapping]] = ...) -> None: ...

class DiffVersionsResponse(_message.Message):
    __slots__ = ("base", "other", "entries", "only_base", "only_other", "compared", "changed", "unchanged", "mismatched")
    BASE_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ONLY_BASE_FIELD_NUMBER: _ClassVar[int]
    ONLY_OTHER_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_FIELD_NUMBER: _ClassVar[int]
    base: ModelVersion
    other: ModelVersion
    entries: _containers.RepeatedCompositeFieldContainer[TensorDiff]
    only_base: _containers.RepeatedScalarFieldContainer[str]
    only_other: _containers.RepeatedScalarFieldContainer[str]
    compared: int
    changed: int
    unchanged: int
    mismatched: int
    def __init__(self, base: _Optional[_Union[ModelVersion, _Mapping]] = ..., other: _Optional[_Union[ModelVersion, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[TensorDiff, _Mapping]]] = ..., only_base: _Optional[_Iterable[str]] = ..., only_other: _Optional[_Iterable[str]] = ..., compared: _Optional[int] = ..., changed: _Optional[int] = ..., unchanged: _Optional[int] = ..., mismatched: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("optimizer", "learning_rate", "epochs", "max_steps", "batch_size", "loss", "weight_decay", "momentum", "grad_clip_norm", "schedule", "warmup_steps", "seed", "freeze", "val_split", "early_stopping_patience", "precision", "log_every_steps")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    VAL_SPLIT_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LOG_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    learning_rate: float
    epochs: int
    max_steps: int
    batch_size: int
    loss: str
    weight_decay: float
    momentum: float
    grad_clip_norm: float
    schedule: str
    warmup_steps: int
    seed: int
    freeze: _containers.RepeatedScalarFieldContainer[str]
    val_split: float
    early_stopping_patience: int
    precision: str
    log_every_steps: int
    def __init__(self, optimizer: _Optional[str] = ..., learning_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., loss: _Optional[str] = ..., weight_decay: _Optional[float] = ..., momentum: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ..., schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., seed: _Optional[int] = ..., freeze: _Optional[_Iterable[str]] = ..., val_split: _Optional[float] = ..., early_stopping_patience: _Optional[int] = ..., precision: _Optional[str] = ..., log_every_steps: _Optional[int] = ...) -> None: ...

class JobEpoch(_message.Message):
    __slots__ = ("epoch", "train_loss", "val_loss", "checkpoint", "finished_at")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    train_loss: float
    val_loss: float
    checkpoint: bool
    finished_at: float
    def __init__(self, epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., checkpoint: _Optional[bool] = ..., finished_at: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "model", "base_version", "dataset", "spec", "state", "created_at", "started_at", "finished_at", "reason", "result_version", "alias", "alias_moved", "attempts", "worker", "epochs", "best_epoch", "progress", "cancel_requested", "metrics", "created_by")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_MOVED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BEST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    base_version: int
    dataset: str
    spec: JobSpec
    state: JobState
    created_at: float
    started_at: float
    finished_at: float
    reason: str
    result_version: int
    alias: str
    alias_moved: bool
    attempts: int
    worker: str
    epochs: _containers.RepeatedCompositeFieldContainer[JobEpoch]
    best_epoch: int
    progress: JobEvent
    cancel_requested: bool
    metrics: _containers.ScalarMap[str, float]
    created_by: str
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., base_version: _Optional[int] = ..., dataset: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., reason: _Optional[str] = ..., result_version: _Optional[int] = ..., alias: _Optional[str] = ..., alias_moved: _Optional[bool] = ..., attempts: _Optional[int] = ..., worker: _Optional[str] = ..., epochs: _Optional[_Iterable[_Union[JobEpoch, _Mapping]]] = ..., best_epoch: _Optional[int] = ..., progress: _Optional[_Union[JobEvent, _Mapping]] = ..., cancel_requested: _Optional[bool] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_by: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "seq", "at", "kind", "state", "message", "epoch", "epochs", "step", "total_steps", "loss", "val_loss", "learning_rate", "examples_per_second", "eta_seconds", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    at: float
    kind: JobEventKind
    state: JobState
    message: str
    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    val_loss: float
    learning_rate: float
    examples_per_second: float
    eta_seconds: float
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., at: _Optional[float] = ..., kind: _Optional[_Union[JobEventKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., examples_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., attempt: _Optional[int] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("base", "dataset", "spec", "alias")
    BASE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    base: ModelRef
    dataset: str
    spec: JobSpec
    alias: str
    def __init__(self, base: _Optional[_Union[ModelRef, _Mapping]] = ..., dataset: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., alias: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("model", "states", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    limit: int
    def __init__(self, model: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class ListJobEventsRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "limit")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    limit: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class PromoteJobRequest(_message.Message):
    __slots__ = ("job_id", "epoch", "alias")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    alias: str
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., alias: _Optional[str] = ...) -> None: ...

class PromoteJobResponse(_message.Message):
    __slots__ = ("version", "epoch")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    version: ModelVersion
    epoch: int
    def __init__(self, version: _Optional[_Union[ModelVersion, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class DatasetTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class UploadDatasetHeader(_message.Message):
    __slots__ = ("name", "description", "tensors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    tensors: _containers.RepeatedCompositeFieldContainer[DatasetTensor]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[DatasetTensor, _Mapping]]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadDatasetHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadDatasetHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "digest", "size", "tensors", "description", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    size: int
    tensors: _containers.RepeatedCompositeFieldContainer[DatasetTensor]
    description: str
    created_at: float
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[DatasetTensor, _Mapping]]] = ..., description: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class UploadDatasetResponse(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...
