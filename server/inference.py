"""Inference as a plain function: check inputs against the class's spec, batch, forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moduleserve.registry.entities import ModuleClass
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.formats import parse_dtype
from moduleserve.server.convert import check_input
from moduleserve.server.engine.cache import LoadedModel, ModelCache
from moduleserve.server.errors import InvalidTensorError


def check_inputs(
    model: str, module_class: ModuleClass, inputs: Mapping[str, torch.Tensor], max_batch_size: int
) -> int:
    """Check names, dtypes, shapes and the batch size; return the number of rows."""
    expected = [spec.name for spec in module_class.inputs]
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
    for spec in module_class.inputs:
        tensor = inputs[spec.name]
        check_input(spec.name, tensor, parse_dtype(spec.dtype), spec.shape)
        if rows is None:
            rows = tensor.shape[0] if tensor.dim() else 1
        elif tensor.shape[0] != rows:
            raise InvalidTensorError(
                spec.name,
                f"has {tensor.shape[0]} rows, but input {module_class.inputs[0].name!r} has {rows}",
            )
    assert rows is not None
    if rows == 0:
        raise InvalidTensorError(module_class.inputs[0].name, "is an empty batch (0 rows)")
    if rows > max_batch_size:
        raise InvalidTensorError(
            module_class.inputs[0].name,
            f"has {rows} rows, more than model {model!r}'s max_batch_size {max_batch_size}",
        )
    return rows


def check_requested(model: str, module_class: ModuleClass, requested: Sequence[str]) -> None:
    """Every requested output must be one the class declares."""
    known = [spec.name for spec in module_class.outputs]
    for name in requested:
        if name not in known:
            raise InvalidInputError(
                f"requested output {name!r} is not an output of model {model!r} "
                f"(outputs: {', '.join(known)})",
            )


async def infer(
    cache: ModelCache,
    model: str,
    ref: str,
    inputs: Mapping[str, torch.Tensor],
    *,
    requested: Sequence[str] = (),
    deadline: float | None = None,
    priority: int = 0,
) -> tuple[LoadedModel, dict[str, torch.Tensor]]:
    """Run one request through the model's dynamic batcher; returns the model and outputs."""
    loaded = await cache.get(model, ref)
    check_inputs(model, loaded.module_class, inputs, loaded.batching.max_batch_size)
    check_requested(model, loaded.module_class, requested)
    outputs = await loaded.batcher.infer(inputs, deadline=deadline, priority=priority)
    if requested:
        outputs = {name: outputs[name] for name in requested}
    return loaded, outputs
