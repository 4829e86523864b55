"""A model's input and output specs, parsed once at load into what each request is checked
against: names, torch dtypes, shapes, and the batcher's merge key of a valid request."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from moduleserve.registry.entities import ModuleClass
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.formats import parse_dtype
from moduleserve.server.convert import check_input
from moduleserve.server.engine.batcher import signature_of
from moduleserve.server.errors import InvalidTensorError


@dataclass(frozen=True)
class _Single:
    """The one input of a single-input model whose spec is [-1, fixed sizes...]: any tensor
    of its dtype, rank and fixed sizes is valid (rows aside)."""

    name: str
    dtype: torch.dtype
    tail: tuple[int, ...]  # the spec's shape past dimension 0
    signature: Hashable  # what signature_of returns for every such tensor


class InputPlan:
    """Checks requests against one model's specs; built once per loaded model.

    `check` gives the same answers and error sentences as `check_slow` followed by
    `signature_of`, without parsing dtype names or walking specs per request.
    """

    def __init__(self, model: str, module_class: ModuleClass, max_batch_size: int) -> None:
        self.model = model
        self.module_class = module_class
        self.max_batch_size = max_batch_size
        self.input_names = tuple(spec.name for spec in module_class.inputs)
        self.output_names = frozenset(spec.name for spec in module_class.outputs)
        self.dtypes = tuple(parse_dtype(spec.dtype) for spec in module_class.inputs)
        self._single = _single_of(module_class, self.dtypes)

    def check(self, inputs: Mapping[str, torch.Tensor]) -> tuple[int, Hashable]:
        """Rows and merge key of a valid request; InvalidInputError names what is wrong."""
        single = self._single
        if single is not None and len(inputs) == 1:
            tensor = inputs.get(single.name)
            if tensor is not None and tensor.dtype is single.dtype:
                shape = tensor.shape
                if shape[1:] == single.tail and len(shape) == len(single.tail) + 1:
                    rows = shape[0]
                    if 0 < rows <= self.max_batch_size:
                        return rows, single.signature
        # Anything unusual (or wrong) takes the full check, which words every error.
        self.check_slow(inputs)
        return signature_of(inputs)

    def check_slow(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Check names, dtypes, shapes and the batch size; return the number of rows."""
        model, specs = self.model, self.module_class.inputs
        expected = self.input_names
        for name in inputs:
            if name not in expected:
                raise InvalidTensorError(
                    name, f"is not an input of model {model!r} (inputs: {', '.join(expected)})"
                )
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise InvalidTensorError(
                missing[0], f"is missing; model {model!r} needs {', '.join(expected)}"
            )
        rows = None
        for spec, dtype in zip(specs, self.dtypes, strict=True):
            tensor = inputs[spec.name]
            check_input(spec.name, tensor, dtype, spec.shape)
            if rows is None:
                rows = tensor.shape[0] if tensor.dim() else 1
            elif tensor.shape[0] != rows:
                raise InvalidTensorError(
                    spec.name,
                    f"has {tensor.shape[0]} rows, but input {specs[0].name!r} has {rows}",
                )
        assert rows is not None
        if rows == 0:
            raise InvalidTensorError(specs[0].name, "is an empty batch (0 rows)")
        if rows > self.max_batch_size:
            raise InvalidTensorError(
                specs[0].name,
                f"has {rows} rows, more than model {model!r}'s max_batch_size "
                f"{self.max_batch_size}",
            )
        return rows

    def check_requested(self, requested: Sequence[str]) -> None:
        """Every requested output must be one the class declares."""
        for name in requested:
            if name not in self.output_names:
                known = [spec.name for spec in self.module_class.outputs]
                raise InvalidInputError(
                    f"requested output {name!r} is not an output of model {self.model!r} "
                    f"(outputs: {', '.join(known)})",
                )


def _single_of(module_class: ModuleClass, dtypes: Sequence[torch.dtype]) -> _Single | None:
    """The fast-path description of a single-input class, or None when it has none."""
    if len(module_class.inputs) != 1:
        return None
    spec = module_class.inputs[0]
    shape = tuple(spec.shape)
    # A fixed dimension 0, or a free one further on, is rare: the full check handles those.
    if not shape or shape[0] != -1 or -1 in shape[1:]:
        return None
    tail = shape[1:]
    probe = torch.empty((1, *tail), dtype=dtypes[0], device="meta")
    _, signature = signature_of({spec.name: probe})
    return _Single(spec.name, dtypes[0], tail, signature)
