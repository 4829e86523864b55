"""A fine-tuning job's hyperparameters: defaults, and the checks that need no data or torch."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from moduleserve.registry.errors import InvalidInputError

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("cross_entropy", "mse", "l1")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")

# Bounds of the counts, here alone (the README's fine-tuning section lists them): a value
# past one is a typo or a unit mix-up, and would hold a worker for months or overflow the
# counters the worker stores.
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000
"""Bound of max_steps, warmup_steps and log_every_steps."""
MAX_BATCH_SIZE = 65_536
MAX_PATIENCE = MAX_EPOCHS


@dataclass(frozen=True)
class JobSpec:
    """Hyperparameters of one fine-tuning job (stored whole on the job and the result)."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    epochs: int = 1
    max_steps: int = 0
    """Stop after this many optimizer steps in all; 0 runs every epoch."""
    batch_size: int = 32
    loss: str = "cross_entropy"
    weight_decay: float = 0.0
    momentum: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the gradients' global L2 norm; 0 turns clipping off."""
    schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    freeze: tuple[str, ...] = field(default_factory=tuple)
    """fnmatch globs of parameter names kept frozen; each must match at least one."""
    val_split: float = 0.0
    early_stopping_patience: int = 0
    precision: str = "fp32"
    log_every_steps: int = 10

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored in the database and on the result version)."""
        data = asdict(self)
        data["freeze"] = list(self.freeze)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown hyperparameter(s): {', '.join(unknown)}")
        values = dict(data)
        if "freeze" in values:
            values["freeze"] = tuple(values["freeze"])
        return cls(**values)

    def check(self) -> JobSpec:
        """Raise InvalidInputError naming the first field out of range; returns self."""
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("loss", self.loss, LOSSES)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("precision", self.precision, PRECISIONS)
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate must be > 0, got {self.learning_rate}",
        )
        _in_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _in_range("max_steps", self.max_steps, 0, MAX_STEPS, " (0: every epoch)")
        _in_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0, got {self.weight_decay}",
        )
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _require(
            math.isfinite(self.grad_clip_norm) and self.grad_clip_norm >= 0,
            f"grad_clip_norm must be >= 0 (0: off), got {self.grad_clip_norm}",
        )
        _in_range("warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        _require(0 <= self.val_split < 1, f"val_split must be in [0, 1), got {self.val_split}")
        _in_range(
            "early_stopping_patience", self.early_stopping_patience, 0, MAX_PATIENCE, " (0: off)"
        )
        _require(
            self.early_stopping_patience == 0 or self.val_split > 0,
            "early_stopping_patience needs a validation set: set val_split > 0",
        )
        _in_range("log_every_steps", self.log_every_steps, 1, MAX_STEPS)
        _require(-(2**63) <= self.seed < 2**63, f"seed must fit in 64 bits, got {self.seed}")
        for pattern in self.freeze:
            _require(bool(pattern.strip()), "freeze patterns must not be blank")
        return self

    def frozen_names(self, parameter_names: list[str]) -> list[str]:
        """The parameters the freeze globs select; a glob matching nothing is an error."""
        selected: set[str] = set()
        for pattern in self.freeze:
            matched = fnmatch.filter(parameter_names, pattern)
            if not matched:
                raise InvalidInputError(
                    f"freeze pattern {pattern!r} matches no parameter "
                    f"(parameters: {_preview(parameter_names)})"
                )
            selected.update(matched)
        return [name for name in parameter_names if name in selected]


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"unknown {name} {value!r}: use one of {', '.join(choices)}")


def _in_range(name: str, value: int, low: int, high: int, note: str = "") -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
        f"{name} must be from {low} to {high}{note}, got {value!r}",
    )


def _require(condition: bool, sentence: str) -> None:
    if not condition:
        raise InvalidInputError(sentence)


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")
