"""The results of introspection, one set of frozen dataclasses for client, server and registry.

The Introspection client decodes replies into them, and ``registry.introspect`` builds them
from modules, so the server, the admin CLI and `moduleserve inspect` share one vocabulary.
Plain data with `to_dict()` for JSON: no grpc, numpy or torch here. Diffs compare `other`
against `base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moduleserve.client.tables import ToDict

TensorKind = Literal["parameter", "buffer", ""]  # "" where the kind is unknown
KindFilter = Literal["all", "parameters", "buffers"]


@dataclass(frozen=True)
class ModelVersion(ToDict):
    """The version a model reference resolved to; `loaded`: figures are from the served module."""

    model: str
    version: int
    class_name: str
    loaded: bool

    def __str__(self) -> str:
        return f"{self.model}:{self.version}"


@dataclass(frozen=True)
class ModuleNode(ToDict):
    """One submodule with its parameter counts (a tensor shared in the subtree counts once)."""

    name: str  # qualified name, "" for the root
    depth: int
    class_name: str
    extra_repr: str
    parameters: int
    trainable: int
    frozen: int
    own_parameters: int  # registered directly on this module


@dataclass(frozen=True)
class Totals(ToDict):
    """Whole-module counts; a tensor registered under several names counts once."""

    parameters: int
    trainable: int
    frozen: int
    parameter_bytes: int
    parameter_tensors: int
    buffer_elements: int
    buffer_bytes: int
    buffer_tensors: int


@dataclass(frozen=True)
class ModuleTree(ToDict):
    """The module tree of a version; `text` renders it like `print(model)`, with counts."""

    model: ModelVersion
    nodes: tuple[ModuleNode, ...]
    totals: Totals
    text: str


@dataclass(frozen=True)
class TensorStats(ToDict):
    """Float64 statistics; mean, std, min, max and norm cover the `finite` values only."""

    mean: float | None
    std: float | None  # unbiased like torch.std; None below two finite values
    min: float | None
    max: float | None
    norm: float | None
    zero_fraction: float  # of all elements
    finite: int
    nan_count: int
    inf_count: int


@dataclass(frozen=True)
class TensorSummary(ToDict):
    """A parameter or buffer; `stats` is None for empty, complex or unreadable tensors."""

    name: str
    kind: TensorKind
    shape: tuple[int, ...]
    dtype: str
    device: str
    numel: int
    requires_grad: bool
    tied_to: tuple[str, ...]  # other names viewing the same elements
    stats: TensorStats | None


@dataclass(frozen=True)
class TensorListing(ToDict):
    """The tensors ListTensors selected, with the whole module's totals."""

    model: ModelVersion
    tensors: tuple[TensorSummary, ...]
    totals: Totals


@dataclass(frozen=True)
class DiffMetrics(ToDict):
    """How one tensor changed; norms and max cover positions finite on both sides."""

    changed_elements: int
    nonfinite_changed: int  # changed positions where either side is NaN or Inf
    norm_base: float
    diff_norm: float
    relative_change: float | None  # diff_norm / norm_base; None when that is 0 but other differs
    max_abs_diff: float


@dataclass(frozen=True)
class TensorDiff(ToDict):
    """One key in both versions; `metrics` is None on a shape or dtype mismatch."""

    name: str
    kind: TensorKind
    shape_base: tuple[int, ...]
    shape_other: tuple[int, ...]
    dtype_base: str
    dtype_other: str
    shape_mismatch: bool
    dtype_mismatch: bool
    changed: bool
    metrics: DiffMetrics | None


@dataclass(frozen=True)
class StateDiff(ToDict):
    """Per-key differences of state dict `other` against `base`, with summary counts."""

    entries: tuple[TensorDiff, ...]
    only_base: tuple[str, ...]
    only_other: tuple[str, ...]
    compared: int
    changed: int
    unchanged: int
    mismatched: int


@dataclass(frozen=True)
class VersionDiff(StateDiff):
    """A StateDiff between two model versions, naming them."""

    base: ModelVersion
    other: ModelVersion

    @classmethod
    def of(cls, base: ModelVersion, other: ModelVersion, diff: StateDiff) -> VersionDiff:
        """`diff` labelled with the versions its state dicts came from."""
        return cls(
            entries=diff.entries,
            only_base=diff.only_base,
            only_other=diff.only_other,
            compared=diff.compared,
            changed=diff.changed,
            unchanged=diff.unchanged,
            mismatched=diff.mismatched,
            base=base,
            other=other,
        )
