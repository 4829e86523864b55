"""The fine-tuning loop over a plain nn.Module: no gRPC, no database, every event through hooks.

Batches: each epoch shuffles the training examples with a seeded generator and takes
`steps_per_epoch(train examples, batch_size)` batches. A trailing batch of exactly one
example is dropped (BatchNorm cannot train on one example), so with 33 examples and
batch_size 8 an epoch is 4 steps of 8 and one example per epoch sits out, a different one
each time. The learning rate follows a LambdaLR stepped after every optimizer step: a
linear warm-up from about 0 to `learning_rate` over `warmup_steps`, then constant or a
cosine decay that reaches 0 at `total_steps`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.jobspec import JobSpec
from moduleserve.server.jobs.data import TrainData, split_indices, steps_per_epoch

__all__ = [
    "EpochEnd",
    "Progress",
    "TrainResult",
    "TrainingError",
    "TrainingHooks",
    "fine_tune",
    "split_indices",
    "steps_per_epoch",
]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_FUNCTIONS: dict[str, LossFunction] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESUME_FORMAT = 1


@dataclass(frozen=True)
class Progress:
    """Training progress, sent every `log_every_steps` optimizer steps."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    """Mean training loss over the steps since the previous progress event."""
    learning_rate: float
    """The learning rate the latest step used."""
    examples_per_second: float
    """Training throughput over those steps (validation and hooks not counted)."""
    eta_seconds: float


@dataclass(frozen=True)
class EpochEnd:
    """One finished epoch (a last one cut short by max_steps included) and its checkpoint."""

    epoch: int
    epochs: int
    step: int
    """Optimizer steps done in the whole job when this epoch ended."""
    train_loss: float
    val_loss: float | None
    is_best: bool
    state_dict: dict[str, torch.Tensor]
    """The weights after this epoch: CPU copies, safe to keep."""
    resume_state: dict[str, Any]
    """Plain containers of tensors, numbers and strings: `fine_tune(resume=...)` continues."""


class TrainingHooks(Protocol):
    """What `fine_tune` reports to and asks of its caller."""

    def on_progress(self, progress: Progress) -> None:
        """Called every `log_every_steps` optimizer steps."""

    def on_epoch_end(self, end: EpochEnd) -> None:
        """Called after each epoch's validation."""

    def should_stop(self) -> bool:
        """Checked before every optimizer step; True cancels the job there."""


@dataclass(frozen=True)
class TrainResult:
    """How a `fine_tune` call ended."""

    cancelled: bool
    stopped_early: bool
    """Ended with planned steps left, by early stopping or max_steps (never when cancelled)."""
    epochs_completed: int
    steps: int
    train_loss: float | None
    val_loss: float | None
    best_epoch: int
    best_val_loss: float | None
    state_dict: dict[str, torch.Tensor]


class TrainingError(Exception):
    """Training itself went wrong (a NaN or infinite loss), not the user's forward code."""


def fine_tune(
    module: nn.Module,
    data: TrainData,
    spec: JobSpec,
    *,
    device: torch.device,
    hooks: TrainingHooks,
    resume: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train `module` in place on `data`; with `resume`, continue after that epoch's state."""
    spec.check()
    if spec.precision == "fp16" and device.type != "cuda":
        raise InvalidInputError("precision fp16 needs a CUDA device; use bf16 or fp32")
    run = _Run(module.to(device), data, spec, device, hooks)
    if resume is None:
        torch.manual_seed(spec.seed)
    else:
        run.restore(resume)
    was_training = module.training
    try:
        return run.run()
    finally:
        module.train(was_training)


@dataclass
class _Counters:
    """Where the job stands; all of it goes into the resume state."""

    epoch: int = 0
    step: int = 0
    best_val_loss: float | None = None
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    train_loss: float | None = None
    val_loss: float | None = None

    def record_epoch(self, epoch: int, train_loss: float, val_loss: float | None) -> bool:
        """Count a finished epoch; True when its validation loss is the lowest so far."""
        is_best = val_loss is not None and (
            self.best_val_loss is None or val_loss < self.best_val_loss
        )
        if is_best:
            self.best_val_loss, self.best_epoch = val_loss, epoch
            self.epochs_without_improvement = 0
        elif val_loss is not None:
            self.epochs_without_improvement += 1
        self.epoch, self.train_loss, self.val_loss = epoch, train_loss, val_loss
        return is_best


@dataclass
class _Meter:
    """Training steps since the last progress event."""

    loss_sum: float = 0.0
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0


class _Run:
    """One fine_tune call's objects and counters."""

    def __init__(
        self,
        module: nn.Module,
        data: TrainData,
        spec: JobSpec,
        device: torch.device,
        hooks: TrainingHooks,
    ) -> None:
        self.module = module
        self.data = data
        self.spec = spec
        self.device = device
        self.hooks = hooks
        self.trainable = _trainable_parameters(module, spec)
        self.train_index, self.val_index = split_indices(len(data), spec.val_split, spec.seed)
        self.steps_per_epoch = steps_per_epoch(len(self.train_index), spec.batch_size)
        self.full_steps = spec.epochs * self.steps_per_epoch
        self.total_steps = min(self.full_steps, spec.max_steps or self.full_steps)
        self.optimizer = _make_optimizer(self.trainable, spec)
        total = self.total_steps
        self.scheduler = LambdaLR(self.optimizer, lambda step: _lr_factor(step, spec, total))
        self.scaler = torch.amp.GradScaler(device.type) if spec.precision == "fp16" else None
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.counters = _Counters()
        self.meter = _Meter()
        self.learning_rate = spec.learning_rate

    def run(self) -> TrainResult:
        """Train epoch after epoch until done, early-stopped, capped or cancelled."""
        self.module.train()
        while not self._finished():
            epoch = self.counters.epoch + 1
            train_loss = self._train_epoch(epoch)
            if train_loss is None:
                return self._result(cancelled=True)
            self._end_epoch(epoch, train_loss)
        return self._result(cancelled=False)

    def _finished(self) -> bool:
        counters, patience = self.counters, self.spec.early_stopping_patience
        return (
            counters.epoch >= self.spec.epochs
            or counters.step >= self.total_steps
            or (patience > 0 and counters.epochs_without_improvement >= patience)
        )

    def _train_epoch(self, epoch: int) -> float | None:
        """The epoch's mean training loss, or None when cancelled."""
        order = self.train_index[torch.randperm(len(self.train_index), generator=self.generator)]
        size, loss_sum, steps = self.spec.batch_size, 0.0, 0
        for start in range(0, self.steps_per_epoch * size, size):
            if self.counters.step >= self.total_steps:
                break
            if self.hooks.should_stop():
                return None
            loss_sum += self._step(order[start : start + size], epoch)
            steps += 1
        return loss_sum / steps

    def _step(self, index: torch.Tensor, epoch: int) -> float:
        started = time.perf_counter()
        args, targets = self.data.batch(index, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = _loss(self.spec.loss, self.module(*args), targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # torch stub
        else:
            loss.backward()  # type: ignore[no-untyped-call]  # Tensor.backward is unannotated
        # The one host sync per step: the NaN check and the loss means both need it, and
        # checking before optimizer.step keeps bad values out of the weights.
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {_non_finite(value)} at epoch {epoch}, step {self.counters.step + 1}"
            )
        self.learning_rate = self.optimizer.param_groups[0]["lr"]
        self._optimizer_step()
        self.scheduler.step()
        self.counters.step += 1
        self._record(epoch, value, len(index), time.perf_counter() - started)
        return value

    def _optimizer_step(self) -> None:
        if self.spec.grad_clip_norm > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, self.spec.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _record(self, epoch: int, loss: float, examples: int, seconds: float) -> None:
        """Count one step; every log_every_steps steps, report them and start over."""
        meter = self.meter
        meter.loss_sum += loss
        meter.steps += 1
        meter.examples += examples
        meter.seconds += seconds
        step = self.counters.step
        if step % self.spec.log_every_steps:
            return
        seconds_done = max(meter.seconds, 1e-9)
        progress = Progress(
            epoch=epoch,
            epochs=self.spec.epochs,
            step=step,
            total_steps=self.total_steps,
            loss=meter.loss_sum / meter.steps,
            learning_rate=self.learning_rate,
            examples_per_second=meter.examples / seconds_done,
            eta_seconds=(self.total_steps - step) * seconds_done / meter.steps,
        )
        self.meter = _Meter()
        self.hooks.on_progress(progress)

    def _end_epoch(self, epoch: int, train_loss: float) -> None:
        """Validate, update the early-stopping counters and send the EpochEnd."""
        val_loss = self._validate(epoch) if len(self.val_index) else None
        is_best = self.counters.record_epoch(epoch, train_loss, val_loss)
        end = EpochEnd(
            epoch=epoch,
            epochs=self.spec.epochs,
            step=self.counters.step,
            train_loss=train_loss,
            val_loss=val_loss,
            is_best=is_best,
            state_dict=_cpu_copy(self.module.state_dict()),
            resume_state=self._resume_state(),
        )
        self.hooks.on_epoch_end(end)

    def _validate(self, epoch: int) -> float:
        """Mean loss over the validation examples, under eval() and no_grad()."""
        self.module.eval()
        try:
            with torch.no_grad():
                total = torch.zeros((), dtype=torch.float64, device=self.device)
                for start in range(0, len(self.val_index), self.spec.batch_size):
                    index = self.val_index[start : start + self.spec.batch_size]
                    args, targets = self.data.batch(index, self.device)
                    with self._autocast():
                        loss = _loss(self.spec.loss, self.module(*args), targets)
                    total += loss.double() * len(index)
                value = total.item() / len(self.val_index)
        finally:
            self.module.train()
        if not math.isfinite(value):
            raise TrainingError(f"validation loss became {_non_finite(value)} at epoch {epoch}")
        return value

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = AUTOCAST_DTYPES.get(self.spec.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _resume_state(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "format": RESUME_FORMAT,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            **asdict(self.counters),
            "optimizer": _cpu_copy(self.optimizer.state_dict()),
            "scheduler": _cpu_copy(self.scheduler.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "shuffle_rng_state": self.generator.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state(self.device) if cuda else None,
        }

    def restore(self, resume: Mapping[str, Any]) -> None:
        """Continue from an EpochEnd.resume_state (the module already holds its weights)."""
        if resume.get("format") != RESUME_FORMAT:
            raise InvalidInputError(f"resume state has unknown format {resume.get('format')!r}")
        planned = (resume.get("steps_per_epoch"), resume.get("total_steps"))
        if planned != (self.steps_per_epoch, self.total_steps):
            raise InvalidInputError(
                f"resume state was made for {planned[0]} steps per epoch and {planned[1]} "
                f"in all, but this job has {self.steps_per_epoch} and {self.total_steps}"
            )
        try:
            self._load_states(resume)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInputError(f"resume state does not fit this job ({exc})") from exc

    def _load_states(self, resume: Mapping[str, Any]) -> None:
        # The optimizer first: it also brings back each group's lr, which LambdaLR's
        # constructor has just overwritten.
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        if self.scaler is not None and resume["scaler"] is not None:
            self.scaler.load_state_dict(resume["scaler"])
        self.generator.set_state(resume["shuffle_rng_state"])
        torch.set_rng_state(resume["torch_rng_state"])
        if self.device.type == "cuda" and resume["cuda_rng_state"] is not None:
            torch.cuda.set_rng_state(resume["cuda_rng_state"], self.device)
        self.counters = _Counters(**{field.name: resume[field.name] for field in fields(_Counters)})

    def _result(self, *, cancelled: bool) -> TrainResult:
        counters = self.counters
        return TrainResult(
            cancelled=cancelled,
            stopped_early=not cancelled and counters.step < self.full_steps,
            epochs_completed=counters.epoch,
            steps=counters.step,
            train_loss=counters.train_loss,
            val_loss=counters.val_loss,
            best_epoch=counters.best_epoch,
            best_val_loss=counters.best_val_loss,
            state_dict=_cpu_copy(self.module.state_dict()),
        )


def _trainable_parameters(module: nn.Module, spec: JobSpec) -> list[nn.Parameter]:
    """Freeze the spec's globs; the rest of the parameters that still want gradients."""
    named = list(module.named_parameters())
    frozen = set(spec.frozen_names([name for name, _ in named]))
    for name, parameter in named:
        if name in frozen:
            parameter.requires_grad_(False)
    trainable = [parameter for _, parameter in named if parameter.requires_grad]
    if not trainable:
        raise InvalidInputError("every parameter of the model is frozen; nothing would train")
    return trainable


def _make_optimizer(params: list[nn.Parameter], spec: JobSpec) -> torch.optim.Optimizer:
    lr, decay = spec.learning_rate, spec.weight_decay
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def _lr_factor(step: int, spec: JobSpec, total_steps: int) -> float:
    """The learning-rate multiplier for 0-based optimizer step `step`."""
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    if spec.schedule == "constant":
        return 1.0
    progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _loss(name: str, output: Any, targets: torch.Tensor) -> torch.Tensor:
    """The loss of the first output, computed in at least float32."""
    if isinstance(output, tuple | list):
        output = output[0]
    if output.dtype in (torch.float16, torch.bfloat16):
        output = output.float()
    if targets.is_floating_point():
        targets = targets.to(output.dtype)
    loss: torch.Tensor = LOSS_FUNCTIONS[name](output, targets)
    return loss


def _non_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else "infinite"


def _cpu_copy(value: Any) -> Any:
    """Deep CPU copies of the tensors in plain containers; tied tensors stay tied."""
    memo: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            key = _storage_key(item)
            if key not in memo:
                memo[key] = item.detach().to("cpu", copy=True)
            return memo[key]
        if isinstance(item, dict):
            return {name: copy(inner) for name, inner in item.items()}
        if isinstance(item, list | tuple):
            return type(item)(copy(inner) for inner in item)
        return item

    return copy(value)


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    if tensor.numel() == 0:
        return (id(tensor),)
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )
