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
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_PARAMETER: TensorKind
TENSOR_KIND_BUFFER: TensorKind

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
