"""Stored versions under ``registry.introspect``: what both the server and the admin CLI inspect.

A version is built from the registry for the one call and dropped, unless the caller
passes the ``live`` module it already holds (the server does, for a loaded version). The
module tree needs no weights at all, so it is built on the meta device.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from moduleserve.client.introspection_results import (
    KindFilter,
    ModuleNode,
    StateDiff,
    TensorSummary,
    Totals,
)
from moduleserve.registry import introspect
from moduleserve.registry.entities import Version
from moduleserve.registry.errors import InvalidInputError

if TYPE_CHECKING:
    from moduleserve.registry.api import Registry


class IncompatibleClassesError(InvalidInputError):
    """Two versions to diff belong to different Module classes (different import paths)."""

    def __init__(self, base: Version, base_path: str, other: Version, other_path: str) -> None:
        super().__init__(
            f"cannot diff {other.model}:{other.version} ({other_path}) against "
            f"{base.model}:{base.version} ({base_path}): they are different Module classes"
        )
        self.base, self.other = base, other


def element_cap(requested: int, ceiling: int | None = None) -> int:
    """The element cap for tensor values: `requested` (0 for the default), at most `ceiling`."""
    if requested < 0:
        raise InvalidInputError(f"max_elements must be 0 or more, not {requested}")
    cap = requested or introspect.DEFAULT_MAX_ELEMENTS
    return cap if ceiling is None else min(cap, ceiling)


def tree(
    registry: Registry, version: Version, live: nn.Module | None = None
) -> tuple[list[ModuleNode], Totals]:
    """Module tree and totals; structure alone, so an unloaded version is built on meta."""
    if live is None:
        live = registry.classes.build(registry.module_class_of(version), device="meta")
    return introspect.module_tree(live), introspect.totals(live)


def summaries(
    registry: Registry,
    version: Version,
    kind: KindFilter = "all",
    pattern: str | None = None,
    live: nn.Module | None = None,
) -> tuple[list[TensorSummary], Totals]:
    """Tensor summaries of the live module, or of the version built on the CPU for this call."""
    module = live if live is not None else registry.build_version(version, "cpu")
    return introspect.tensor_summaries(module, kind, pattern), introspect.totals(module)


def values(
    registry: Registry,
    version: Version,
    name: str,
    slices: str | None = None,
    cap: int = introspect.DEFAULT_MAX_ELEMENTS,
    live: nn.Module | None = None,
) -> torch.Tensor:
    """One tensor's (sliced) values as a CPU copy."""
    module = live if live is not None else registry.build_version(version, "cpu")
    return introspect.tensor_values(module, name, slices, cap)


def diff(
    registry: Registry, base_ref: tuple[str, str], other_ref: tuple[str, str]
) -> tuple[Version, Version, StateDiff]:
    """Diff two stored checkpoints of one Module class; entry kinds come from a meta build.

    Refuses (IncompatibleClassesError) versions of classes with different import paths.
    """
    base = registry.checkpoints.resolve(*base_ref)
    other = registry.checkpoints.resolve(*other_ref)
    base_class, other_class = registry.module_class_of(base), registry.module_class_of(other)
    if base_class.import_path != other_class.import_path:
        raise IncompatibleClassesError(base, base_class.import_path, other, other_class.import_path)
    kinds = introspect.tensor_kinds(registry.classes.build(base_class, device="meta"))
    # Stored checkpoints come back sorted by key; report in the module's own order instead.
    base_tensors = _in_order(registry.state_dict(base), kinds)
    other_tensors = _in_order(registry.state_dict(other), kinds)
    diff = introspect.diff_state_dicts(base_tensors, other_tensors, kinds=kinds)
    return base, other, diff


def _in_order(tensors: dict[str, torch.Tensor], order: Iterable[str]) -> dict[str, torch.Tensor]:
    """`tensors` with the names in `order` first, in that order, then any others."""
    ordered = {name: tensors[name] for name in order if name in tensors}
    ordered.update((name, tensor) for name, tensor in tensors.items() if name not in ordered)
    return ordered
