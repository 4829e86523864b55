"""Turning a stored state_dict into a live nn.Module: strict, dtype-faithful, one copy."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain

import torch
from torch import nn

from moduleserve.registry.errors import StateDictMismatchError
from moduleserve.registry.formats import dtype_name


def check_fits(
    class_name: str,
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    source: str = "state_dict",
    *,
    kinds: bool = True,
) -> None:
    """Raise StateDictMismatchError naming missing/unexpected keys, shape and dtype mismatches.

    With `kinds` (a push), a dtype may differ only within its kind (float64 into a float32
    layer is cast at load); bool or complex values in a float layer, or floats in an integer
    buffer, are refused. Loading a stored version passes `kinds=False`: versions pushed
    before that check existed (a state_dict cast with `.float()`, say) keep loading.
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    common = sorted(set(expected) & set(given))
    mismatched = [
        (key, list(expected[key].shape), list(given[key].shape))
        for key in common
        if tuple(expected[key].shape) != tuple(given[key].shape)
    ]
    wrong_dtypes = [
        (key, dtype_name(expected[key].dtype), dtype_name(given[key].dtype))
        for key in common
        if kinds and dtype_kind(expected[key].dtype) != dtype_kind(given[key].dtype)
    ]
    if missing or unexpected or mismatched or wrong_dtypes:
        raise StateDictMismatchError(
            class_name, missing, unexpected, mismatched, wrong_dtypes, source=source
        )


def dtype_kind(dtype: torch.dtype) -> str:
    """ "bool", "complex", "float" or "integer": a cast within a kind keeps what values mean."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def state_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """The bytes a state_dict's tensors hold (meta tensors included: only sizes count)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def load_into(
    class_name: str, skeleton: nn.Module, tensors: Mapping[str, torch.Tensor]
) -> nn.Module | None:
    """Load `tensors` strictly into a module built on the meta device, without a second copy.

    `assign=True` adopts the given tensors as the parameters instead of copying
    into freshly allocated ones. Returns None when the class keeps state outside
    its state_dict (non-persistent buffers, plain tensor attributes) that a meta
    build cannot fill; the caller then builds it for real.
    """
    expected = skeleton.state_dict()
    check_fits(class_name, expected, tensors, kinds=False)
    # The class decides the dtypes; a float64 upload into a float32 layer is cast.
    matched = {
        key: value if value.dtype == expected[key].dtype else value.to(expected[key].dtype)
        for key, value in tensors.items()
    }
    ties = _tied_groups(skeleton)
    skeleton.load_state_dict(matched, strict=True, assign=True)
    _retie(skeleton, ties)
    return None if _has_meta_state(skeleton) else skeleton


def load_copying(
    class_name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Load strictly into a module built normally (the fallback path of `load_into`)."""
    check_fits(class_name, module.state_dict(), tensors, kinds=False)
    module.load_state_dict(dict(tensors), strict=True)
    return module


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Names of parameters that are one Parameter object (e.g. a decoder tied to an encoder)."""
    by_identity: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), []).append(name)
    return [names for names in by_identity.values() if len(names) > 1]


def _retie(module: nn.Module, groups: list[list[str]]) -> None:
    # assign=True gives each name its own Parameter; make the tied names one object again
    # so that training updates them together.
    for first, *rest in groups:
        shared = module.get_parameter(first)
        for name in rest:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, shared)


def _has_meta_state(module: nn.Module) -> bool:
    tensors = chain(module.parameters(), module.buffers())
    if any(t.is_meta for t in tensors):
        return True
    return any(
        isinstance(value, torch.Tensor) and value.is_meta
        for sub in module.modules()
        for value in vars(sub).values()
    )
