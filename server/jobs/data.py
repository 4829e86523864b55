"""A fine-tuning dataset: named tensors checked against a Module class before anything trains.

Convention: a tensor `targets`, plus either `inputs` (classes with one input) or one tensor
per forward() parameter name. Every check failure is one `InvalidInputError` sentence that
names the tensor. Also here: how the examples divide into a validation split and batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from moduleserve.registry.entities import ModuleClass, TensorSpec
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.formats import dtype_name, parse_dtype
from moduleserve.registry.jobspec import JobSpec

TARGETS = "targets"
SINGLE_INPUT = "inputs"
CLASS_LOSSES = ("cross_entropy",)
# Decorrelates the validation split from the shuffle order, which uses the bare seed.
SPLIT_SEED_SALT = 0x5EED_5EED


@dataclass(frozen=True)
class TrainData:
    """Checked training tensors: inputs keyed by forward() name in forward order, dim 0 examples."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor

    def __len__(self) -> int:
        """The number of examples."""
        return int(self.targets.shape[0])

    def batch(
        self, index: torch.Tensor, device: torch.device
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The examples at `index` on `device`: forward() arguments in order, and targets."""
        args = [_take(tensor, index, device) for tensor in self.inputs.values()]
        return args, _take(self.targets, index, device)


def train_data_from(
    tensors: Mapping[str, torch.Tensor], module_class: ModuleClass, spec: JobSpec
) -> TrainData:
    """Check a dataset's tensors against the class and loss; cast inputs to the spec dtypes."""
    names = _input_names(tensors, module_class)
    count = _example_count(tensors)
    _check_split(count, spec.val_split)
    inputs = {
        input_spec.name: _checked_input(name, tensors[name], input_spec)
        for name, input_spec in zip(names, module_class.inputs, strict=True)
    }
    output = module_class.outputs[0] if module_class.outputs else None
    targets = _checked_targets(tensors[TARGETS], output, spec.loss)
    return TrainData(inputs, targets)


def validation_size(count: int, val_split: float) -> int:
    """How many of `count` examples the validation split holds (at least 1 when val_split > 0)."""
    if val_split <= 0:
        return 0
    return max(1, round(count * val_split))


def split_indices(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, validation) example indices, each sorted."""
    generator = torch.Generator().manual_seed(seed ^ SPLIT_SEED_SALT)
    order = torch.randperm(n, generator=generator)
    held_out = validation_size(n, val_split)
    return order[held_out:].sort().values, order[:held_out].sort().values


def steps_per_epoch(train_examples: int, batch_size: int) -> int:
    """Batches per epoch: a trailing batch of exactly one example is dropped (BatchNorm)."""
    steps = math.ceil(train_examples / batch_size)
    if batch_size > 1 and train_examples > 1 and train_examples % batch_size == 1:
        steps -= 1
    return steps


def _input_names(tensors: Mapping[str, torch.Tensor], module_class: ModuleClass) -> list[str]:
    """The dataset tensor names feeding each forward() parameter, in order; extras refused."""
    wanted = [spec.name for spec in module_class.inputs]
    needs = _needs_text(module_class)
    if TARGETS not in tensors:
        raise InvalidInputError(f"dataset has no tensor {TARGETS!r}; {needs}")
    if len(wanted) == 1 and wanted[0] != SINGLE_INPUT:
        present = [name for name in (SINGLE_INPUT, wanted[0]) if name in tensors]
        if len(present) == 2:
            raise InvalidInputError(
                f"dataset has both {SINGLE_INPUT!r} and {wanted[0]!r}; keep one of them"
            )
        if not present:
            raise InvalidInputError(
                f"dataset has no tensor {SINGLE_INPUT!r} (or {wanted[0]!r}); {needs}"
            )
        names = present
    else:
        missing = [name for name in wanted if name not in tensors]
        if missing:
            raise InvalidInputError(f"dataset has no tensor {missing[0]!r}; {needs}")
        names = wanted
    extra = sorted(set(tensors) - {*names, TARGETS})
    if extra:
        raise InvalidInputError(f"dataset tensor {extra[0]!r} is not used; {needs}")
    return names


def _needs_text(module_class: ModuleClass) -> str:
    """E.g. "a dataset for class MLP needs 'inputs' (or 'x') and 'targets'"."""
    wanted = [spec.name for spec in module_class.inputs]
    if len(wanted) == 1 and wanted[0] != SINGLE_INPUT:
        parts = [f"{SINGLE_INPUT!r} (or {wanted[0]!r})"]
    else:
        parts = [repr(name) for name in wanted]
    return f"a dataset for class {module_class.name} needs {', '.join(parts)} and {TARGETS!r}"


def _example_count(tensors: Mapping[str, torch.Tensor]) -> int:
    """The shared size of dim 0; scalars, disagreeing counts and empty datasets are refused."""
    counts: dict[str, int] = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 0:
            raise InvalidInputError(
                f"dataset tensor {name!r} is a scalar; its dim 0 must count the examples"
            )
        counts[name] = int(tensor.shape[0])
    first, *rest = sorted(counts.items(), key=lambda item: item[0] != TARGETS)
    for name, count in rest:
        if count != first[1]:
            raise InvalidInputError(
                f"dataset tensors disagree on the number of examples: "
                f"{first[0]!r} has {first[1]}, {name!r} has {count}"
            )
    if first[1] == 0:
        raise InvalidInputError("dataset is empty: it has 0 examples")
    return first[1]


def _check_split(count: int, val_split: float) -> None:
    if val_split > 0 and count - validation_size(count, val_split) < 1:
        raise InvalidInputError(
            f"dataset has {count} example(s), too few for val_split {val_split}: "
            "it needs at least 1 validation and 1 training example"
        )


def _checked_input(name: str, tensor: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor in the spec's dtype, after checking its shape beyond dim 0 and its kind."""
    _check_shape(name, tensor, spec.shape)
    dtype = parse_dtype(spec.dtype)
    if _kind(tensor.dtype) != _kind(dtype):
        raise InvalidInputError(
            f"dataset tensor {name!r}: expected {_kind(dtype)} values ({spec.dtype}), "
            f"got {dtype_name(tensor.dtype)}"
        )
    return tensor.to(dtype)


def _checked_targets(tensor: torch.Tensor, output: TensorSpec | None, loss: str) -> torch.Tensor:
    """Targets fitting the loss: class indices for cross_entropy, values shaped like the output."""
    if loss in CLASS_LOSSES:
        return _class_targets(tensor, output, loss)
    if not tensor.is_floating_point():
        raise InvalidInputError(
            f"dataset tensor {TARGETS!r}: loss {loss} needs floating targets, "
            f"got {dtype_name(tensor.dtype)}"
        )
    if output is None:
        return tensor
    _check_shape(TARGETS, tensor, output.shape)
    dtype = parse_dtype(output.dtype)
    return tensor.to(dtype) if dtype.is_floating_point else tensor


def _class_targets(tensor: torch.Tensor, output: TensorSpec | None, loss: str) -> torch.Tensor:
    if _kind(tensor.dtype) != "integer":
        raise InvalidInputError(
            f"dataset tensor {TARGETS!r}: loss {loss} needs integer class indices, "
            f"got {dtype_name(tensor.dtype)}"
        )
    if output is None:
        return tensor.long()
    if len(output.shape) < 2:
        raise InvalidInputError(
            f"output {output.name!r} has shape {list(output.shape)}, "
            f"which has no class dimension for loss {loss}"
        )
    # F.cross_entropy's convention: classes on dim 1, any further dims shared with targets.
    _check_shape(TARGETS, tensor, (-1, *output.shape[2:]))
    _check_class_range(tensor, output.shape[1], loss)
    return tensor.long()


def _check_class_range(tensor: torch.Tensor, classes: int, loss: str) -> None:
    low, high = int(tensor.min()), int(tensor.max())
    bad = low if low < 0 else high if classes > 0 and high >= classes else None
    if bad is not None:
        outputs = f"{classes} outputs" if classes > 0 else "the outputs"
        raise InvalidInputError(
            f"dataset tensor {TARGETS!r}: class index {bad} is out of range for {outputs} "
            f"(loss {loss})"
        )


def _check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int]) -> None:
    """Dims beyond 0 must equal the spec's; -1 matches any size."""
    got = list(tensor.shape)
    fits = len(got) == len(expected) and all(
        want in (-1, size) for want, size in zip(expected[1:], got[1:], strict=True)
    )
    if not fits:
        raise InvalidInputError(
            f"dataset tensor {name!r}: expected shape {list(expected)}, got {got}"
        )


def _take(tensor: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.index_select(0, index.to(tensor.device)).to(device, non_blocking=True)


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"
