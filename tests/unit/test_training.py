"""The fine-tuning core with real torch on CPU: data checks, the loop, resume, schedules, hooks.

Models and datasets are tiny and seeded, so every run takes milliseconds and repeats
bit for bit.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moduleserve.registry.demo.models import MLP, FrozenBackboneNet, TiedAutoencoder, TwoInputNet
from moduleserve.registry.entities import ModuleClass, TensorSpec
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.jobspec import JobSpec
from moduleserve.server.jobs.data import TrainData, steps_per_epoch, train_data_from
from moduleserve.server.jobs.training import (
    EpochEnd,
    Progress,
    TrainingError,
    TrainResult,
    fine_tune,
    split_indices,
)

CPU = torch.device("cpu")


class Recorder:
    """Hooks that keep every event and can ask to stop after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.ends: list[EpochEnd] = []
        self.checks = 0
        self.stop_after = stop_after

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def on_epoch_end(self, end: EpochEnd) -> None:
        self.ends.append(end)

    def should_stop(self) -> bool:
        self.checks += 1
        return self.stop_after is not None and self.checks > self.stop_after


def spec_of(**changes: Any) -> JobSpec:
    """A small, fast spec: SGD, 8 examples a batch, one progress event per step."""
    base: dict[str, Any] = {
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "batch_size": 8,
        "log_every_steps": 1,
    }
    return JobSpec(**(base | changes))


def mlp(seed: int = 100, dropout: float = 0.2) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=8, hidden=[16], out_features=3, dropout=dropout)


def blobs(n: int = 64, seed: int = 1) -> TrainData:
    """Three well separated Gaussian clusters in 8 dimensions: class = cluster."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=generator) * 3
    targets = torch.arange(n) % 3
    inputs = centers[targets] + 0.5 * torch.randn(n, 8, generator=generator)
    return TrainData({"x": inputs}, targets)


def linear_data(n: int = 64, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, 4] and y = x @ w + 0.5 [n, 1]."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=generator)
    weight = torch.tensor([[1.5], [-2.0], [0.5], [1.0]])
    return inputs, inputs @ weight + 0.5


def regression(n: int = 64) -> TrainData:
    inputs, targets = linear_data(n)
    return TrainData({"x": inputs}, targets)


def train(
    module: nn.Module,
    data: TrainData,
    spec: JobSpec,
    hooks: Recorder | None = None,
    resume: Mapping[str, Any] | None = None,
) -> tuple[TrainResult, Recorder]:
    hooks = hooks or Recorder()
    result = fine_tune(module, data, spec, device=CPU, hooks=hooks, resume=resume)
    return result, hooks


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_same(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert different == []


def module_class(
    name: str, inputs: list[tuple[str, str, tuple[int, ...]]], output: tuple[int, ...]
) -> ModuleClass:
    return ModuleClass(
        name=name,
        import_path=f"moduleserve.registry.demo.models:{name}",
        kwargs={},
        inputs=tuple(TensorSpec(*spec) for spec in inputs),
        outputs=(TensorSpec("output", "float32", output),),
        description="",
        created_at=datetime.now(UTC),
    )


MLP_CLASS = module_class("MLP", [("x", "float32", (-1, 8))], (-1, 10))
TWO_CLASS = module_class(
    "TwoInputNet", [("a", "float32", (-1, 4)), ("b", "float32", (-1, 4))], (-1, 2)
)
TOKENS_CLASS = module_class("Tokens", [("ids", "int64", (-1, 5))], (-1, 10))


# --- data -----------------------------------------------------------------------------------

X = torch.randn(64, 8)
LABELS = torch.arange(64) % 10
NEEDS_MLP = "a dataset for class MLP needs 'inputs' (or 'x') and 'targets'"

DATA_ERRORS: list[tuple[dict[str, torch.Tensor], ModuleClass, JobSpec, str]] = [
    ({"x": X}, MLP_CLASS, JobSpec(), f"dataset has no tensor 'targets'; {NEEDS_MLP}"),
    (
        {"targets": LABELS},
        MLP_CLASS,
        JobSpec(),
        f"dataset has no tensor 'inputs' (or 'x'); {NEEDS_MLP}",
    ),
    (
        {"x": X, "inputs": X, "targets": LABELS},
        MLP_CLASS,
        JobSpec(),
        "dataset has both 'inputs' and 'x'; keep one of them",
    ),
    (
        {"x": X, "targets": LABELS, "weights": LABELS},
        MLP_CLASS,
        JobSpec(),
        f"dataset tensor 'weights' is not used; {NEEDS_MLP}",
    ),
    (
        {"a": X[:, :4], "targets": X[:, :2]},
        TWO_CLASS,
        JobSpec(loss="mse"),
        "dataset has no tensor 'b'; a dataset for class TwoInputNet needs 'a', 'b' and 'targets'",
    ),
    (
        {"x": X, "targets": LABELS[:63]},
        MLP_CLASS,
        JobSpec(),
        "dataset tensors disagree on the number of examples: 'targets' has 63, 'x' has 64",
    ),
    (
        {"x": X[:0], "targets": LABELS[:0]},
        MLP_CLASS,
        JobSpec(),
        "dataset is empty: it has 0 examples",
    ),
    (
        {"x": X, "targets": torch.tensor(3)},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'targets' is a scalar; its dim 0 must count the examples",
    ),
    (
        {"x": X[:1], "targets": LABELS[:1]},
        MLP_CLASS,
        JobSpec(val_split=0.5),
        "dataset has 1 example(s), too few for val_split 0.5: "
        "it needs at least 1 validation and 1 training example",
    ),
    (
        {"x": X[:2], "targets": LABELS[:2]},
        MLP_CLASS,
        JobSpec(val_split=0.9),
        "dataset has 2 example(s), too few for val_split 0.9: "
        "it needs at least 1 validation and 1 training example",
    ),
    (
        {"inputs": torch.randn(64, 100), "targets": LABELS},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'inputs': expected shape [-1, 8], got [64, 100]",
    ),
    (
        {"x": X[:, 0], "targets": LABELS},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'x': expected shape [-1, 8], got [64]",
    ),
    (
        {"x": X.long(), "targets": LABELS},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'x': expected floating values (float32), got int64",
    ),
    (
        {"ids": torch.rand(64, 5), "targets": LABELS},
        TOKENS_CLASS,
        JobSpec(),
        "dataset tensor 'ids': expected integer values (int64), got float32",
    ),
    (
        {"x": X, "targets": LABELS.float()},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'targets': loss cross_entropy needs integer class indices, got float32",
    ),
    (
        {"x": X, "targets": LABELS > 4},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'targets': loss cross_entropy needs integer class indices, got bool",
    ),
    (
        {"x": X, "targets": torch.cat([LABELS[:63], torch.tensor([12])])},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'targets': class index 12 is out of range for 10 outputs "
        "(loss cross_entropy)",
    ),
    (
        {"x": X, "targets": torch.cat([LABELS[:63], torch.tensor([10])])},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'targets': class index 10 is out of range for 10 outputs "
        "(loss cross_entropy)",
    ),
    (
        {"x": X, "targets": torch.cat([torch.tensor([-1]), LABELS[1:]])},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'targets': class index -1 is out of range for 10 outputs "
        "(loss cross_entropy)",
    ),
    (
        {"x": X, "targets": LABELS[:, None]},
        MLP_CLASS,
        JobSpec(),
        "dataset tensor 'targets': expected shape [-1], got [64, 1]",
    ),
    (
        {"x": X, "targets": LABELS},
        MLP_CLASS,
        JobSpec(loss="mse"),
        "dataset tensor 'targets': loss mse needs floating targets, got int64",
    ),
    (
        {"x": X, "targets": X[:, 0]},
        MLP_CLASS,
        JobSpec(loss="l1"),
        "dataset tensor 'targets': expected shape [-1, 10], got [64]",
    ),
]


@pytest.mark.parametrize(("tensors", "cls", "spec", "message"), DATA_ERRORS)
def test_bad_datasets_are_refused_with_one_sentence(
    tensors: dict[str, torch.Tensor], cls: ModuleClass, spec: JobSpec, message: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        train_data_from(tensors, cls, spec)
    assert str(caught.value) == message


def test_good_dataset_is_keyed_by_forward_names_and_cast() -> None:
    data = train_data_from({"inputs": X.double(), "targets": LABELS.int()}, MLP_CLASS, JobSpec())
    assert list(data.inputs) == ["x"]
    assert data.inputs["x"].dtype == torch.float32
    assert torch.equal(data.inputs["x"], X.double().float())
    assert data.targets.dtype == torch.int64
    assert len(data) == 64

    two = train_data_from(
        {"b": X[:, 4:], "targets": X[:, :2].double(), "a": X[:, :4]}, TWO_CLASS, JobSpec(loss="mse")
    )
    assert list(two.inputs) == ["a", "b"]
    assert torch.equal(two.inputs["b"], X[:, 4:])
    assert two.targets.dtype == torch.float32

    tokens = train_data_from(
        {"ids": torch.zeros(64, 5, dtype=torch.int32), "targets": LABELS}, TOKENS_CLASS, JobSpec()
    )
    assert tokens.inputs["ids"].dtype == torch.int64


def test_split_indices_are_deterministic_disjoint_and_complete() -> None:
    train_index, val_index = split_indices(10, 0.3, seed=7)
    assert (len(train_index), len(val_index)) == (7, 3)
    assert sorted(torch.cat([train_index, val_index]).tolist()) == list(range(10))
    assert train_index.tolist() == sorted(train_index.tolist())
    again = split_indices(10, 0.3, seed=7)
    assert torch.equal(again[0], train_index) and torch.equal(again[1], val_index)
    assert not torch.equal(split_indices(100, 0.3, seed=8)[1], split_indices(100, 0.3, seed=7)[1])
    assert len(split_indices(10, 0.01, seed=7)[1]) == 1
    no_val = split_indices(5, 0.0, seed=7)
    assert no_val[0].tolist() == [0, 1, 2, 3, 4] and no_val[1].tolist() == []


@pytest.mark.parametrize(
    ("examples", "batch", "steps"),
    [(32, 8, 4), (33, 8, 4), (34, 8, 5), (9, 8, 1), (1, 8, 1), (2, 8, 1), (5, 1, 5)],
)
def test_steps_per_epoch_drops_a_trailing_batch_of_one(
    examples: int, batch: int, steps: int
) -> None:
    assert steps_per_epoch(examples, batch) == steps


# --- what training does to the module --------------------------------------------------------


def test_train_mode_batchnorm_and_freeze_globs() -> None:
    module = mlp().eval()
    before = weights(module)
    modes: list[tuple[bool, bool]] = []
    dropout = module.layers[3]
    dropout.register_forward_hook(
        lambda mod, args, out: modes.append((mod.training, torch.is_grad_enabled()))
    )
    spec = spec_of(epochs=2, val_split=0.25, freeze=("layers.0.*",))
    result, _ = train(module, blobs(), spec)

    after = result.state_dict
    for name in ("layers.0.weight", "layers.0.bias"):
        assert torch.equal(after[name], before[name])
        assert not module.get_parameter(name).requires_grad
    for name in ("layers.1.weight", "layers.1.bias", "layers.4.weight", "layers.4.bias"):
        assert not torch.equal(after[name], before[name]), name
    assert not torch.equal(after["layers.1.running_mean"], before["layers.1.running_mean"])
    assert not torch.equal(after["layers.1.running_var"], before["layers.1.running_var"])
    # 48 training examples / 8 = 6 steps per epoch; validation must not count as batches.
    assert result.steps == 12
    assert after["layers.1.num_batches_tracked"].item() == 12
    assert set(modes[:6]) == {(True, True)}
    assert modes[6:8] == [(False, False), (False, False)]
    assert set(modes) == {(True, True), (False, False)}
    assert module.training is False  # the caller's mode comes back


def test_parameters_frozen_in_init_stay_frozen() -> None:
    torch.manual_seed(5)
    module = FrozenBackboneNet(in_features=8, hidden=16, out_features=3)
    before = weights(module)
    result, _ = train(module, blobs(), spec_of(epochs=1))
    for name in ("backbone.0.weight", "backbone.0.bias"):
        assert torch.equal(result.state_dict[name], before[name])
    for name in ("head.weight", "head.bias"):
        assert not torch.equal(result.state_dict[name], before[name])


def test_freezing_errors() -> None:
    with pytest.raises(
        InvalidInputError, match=r"freeze pattern 'encoder\.\*' matches no parameter"
    ):
        train(mlp(), blobs(), spec_of(freeze=("encoder.*",)))
    with pytest.raises(InvalidInputError) as caught:
        train(mlp(), blobs(), spec_of(freeze=("*",)))
    assert str(caught.value) == "every parameter of the model is frozen; nothing would train"


def _linear(seed: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 1)


@pytest.mark.parametrize(
    ("factory", "data", "spec"),
    [
        (mlp, blobs, spec_of(epochs=6, learning_rate=0.02, momentum=0.9, weight_decay=1e-4)),
        (_linear, regression, spec_of(epochs=6, optimizer="adam", learning_rate=0.05, loss="mse")),
        (_linear, regression, spec_of(epochs=6, optimizer="adamw", learning_rate=0.05, loss="l1")),
        (mlp, blobs, spec_of(epochs=6, precision="bf16")),
    ],
    ids=["sgd-cross_entropy", "adam-mse", "adamw-l1", "sgd-bf16"],
)
def test_loss_falls(
    factory: Callable[[], nn.Module], data: Callable[[], TrainData], spec: JobSpec
) -> None:
    result, hooks = train(factory(), data(), spec)
    losses = [end.train_loss for end in hooks.ends]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.train_loss == losses[-1]
    assert (result.val_loss, result.best_epoch, result.best_val_loss) == (None, 0, None)
    assert not any(end.is_best for end in hooks.ends)
    assert (result.cancelled, result.stopped_early, result.epochs_completed) == (False, False, 6)


def test_bf16_autocasts_the_forward_on_cpu() -> None:
    module = mlp()
    dtypes: list[torch.dtype] = []
    module.layers[0].register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    train(module, blobs(), spec_of(epochs=1, precision="bf16"))
    assert set(dtypes) == {torch.bfloat16}
    assert module.layers[0].weight.dtype == torch.float32  # weights stay fp32


def test_fp16_needs_cuda() -> None:
    with pytest.raises(InvalidInputError) as caught:
        train(mlp(), blobs(), spec_of(precision="fp16"))
    assert str(caught.value) == "precision fp16 needs a CUDA device; use bf16 or fp32"


def test_two_inputs_are_passed_in_forward_order() -> None:
    inputs, targets = linear_data()
    tensors = {"b": inputs.flip(1), "a": inputs, "targets": targets.repeat(1, 2)}
    data = train_data_from(tensors, TWO_CLASS, JobSpec(loss="mse"))
    torch.manual_seed(4)
    module = TwoInputNet(features=4)
    seen: list[torch.Tensor] = []
    module.proj_a.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    spec = spec_of(epochs=8, optimizer="adam", learning_rate=0.05, loss="mse", batch_size=64)
    _, hooks = train(module, data, spec)
    assert torch.equal(seen[0].sort(0).values, inputs.sort(0).values)
    assert hooks.ends[-1].train_loss < 0.5 * hooks.ends[0].train_loss


def test_optimizer_hyperparameters_reach_the_optimizer() -> None:
    cases = {
        "sgd": ({"momentum": 0.9, "weight_decay": 0.01}, "momentum_buffer"),
        "adam": ({"weight_decay": 0.01, "decoupled_weight_decay": False}, "exp_avg"),
        "adamw": ({"weight_decay": 0.01, "decoupled_weight_decay": True}, "exp_avg"),
    }
    for optimizer, (expected, state_key) in cases.items():
        spec = spec_of(optimizer=optimizer, momentum=0.9, weight_decay=0.01, max_steps=1)
        _, hooks = train(_linear(), regression(), spec)
        saved = hooks.ends[0].resume_state["optimizer"]
        group = saved["param_groups"][0]
        assert {key: group[key] for key in expected} == expected, optimizer
        assert state_key in saved["state"][0], optimizer


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_reported_losses_are_the_chosen_loss(loss: str) -> None:
    inputs, values = linear_data(40)
    classes = loss == "cross_entropy"
    targets = (values.squeeze(1) > 0.5).long() if classes else values
    data = TrainData({"x": inputs}, targets)
    train_index, val_index = split_indices(40, 0.25, seed=0)
    torch.manual_seed(8)
    module = nn.Linear(4, 2 if classes else 1)
    with torch.no_grad():
        expected = LOSSES[loss](module(inputs[train_index]), targets[train_index]).item()
    # One training batch of all 30 examples: the first step's loss is the loss of them all.
    _, hooks = train(module, data, spec_of(loss=loss, batch_size=30, val_split=0.25))
    assert hooks.progress[0].loss == pytest.approx(expected, rel=1e-6)
    # Validation batches of 4, 4 and 2 examples, weighted by size.
    result, _ = train(module, data, spec_of(loss=loss, batch_size=4, val_split=0.25))
    with torch.no_grad():
        val_output = module(inputs[val_index])
    expected_val = LOSSES[loss](val_output, targets[val_index]).item()
    assert result.val_loss == pytest.approx(expected_val, rel=1e-6)


def test_each_epoch_shuffles_anew() -> None:
    inputs = torch.arange(16.0)[:, None].repeat(1, 4)
    seen: list[torch.Tensor] = []
    module = _linear()
    module.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 0]))
    train(module, TrainData({"x": inputs}, inputs[:, :1]), spec_of(epochs=2, loss="mse"))
    first, second = torch.cat(seen[:2]), torch.cat(seen[2:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(16))
    assert first.tolist() != second.tolist()
    assert first.tolist() != list(range(16))


def test_gradients_are_clipped_by_global_norm() -> None:
    module = _linear()
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    spec = spec_of(learning_rate=1.0, loss="mse", grad_clip_norm=1e-3, max_steps=1)
    inputs, targets = linear_data()
    train(module, TrainData({"x": inputs}, targets * 100), spec)
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


# --- schedule, progress, step counts ---------------------------------------------------------


def test_learning_rate_warms_up_then_follows_cosine() -> None:
    spec = spec_of(epochs=2, warmup_steps=3, schedule="cosine")
    _, hooks = train(mlp(), blobs(40), spec)  # 5 steps per epoch, 10 in all
    rates = [p.learning_rate for p in hooks.progress]
    expected = [0.1 * (s + 1) / 4 for s in range(3)] + [
        0.05 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 10)
    ]
    assert rates == pytest.approx(expected, rel=1e-9)
    assert rates[:4] == sorted(rates[:4]) and rates[3] == pytest.approx(0.1)
    assert rates[3:] == sorted(rates[3:], reverse=True) and rates[-1] < 0.006


def test_constant_schedule_after_warmup() -> None:
    _, hooks = train(mlp(), blobs(40), spec_of(epochs=1, warmup_steps=2))
    rates = [p.learning_rate for p in hooks.progress]
    assert rates == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1], rel=1e-9)


def test_progress_every_n_steps_averages_the_losses_since_the_last() -> None:
    spec = spec_of(epochs=2)  # 48 examples: 6 steps per epoch, 12 in all
    _, every_step = train(mlp(), blobs(48), spec)
    _, every_third = train(mlp(), blobs(48), dataclasses.replace(spec, log_every_steps=3))
    step_losses = [p.loss for p in every_step.progress]
    events = every_third.progress
    assert [(p.epoch, p.step) for p in events] == [(1, 3), (1, 6), (2, 9), (2, 12)]
    assert {(p.epochs, p.total_steps) for p in events} == {(2, 12)}
    for event in events:
        window = step_losses[event.step - 3 : event.step]
        assert event.loss == (window[0] + window[1] + window[2]) / 3
        assert event.examples_per_second > 0
    assert events[0].eta_seconds > 0 and events[-1].eta_seconds == 0.0


def test_trailing_batch_of_one_is_skipped_and_max_steps_caps() -> None:
    data = blobs(33)  # 4 batches of 8 and one example left over each epoch
    result, hooks = train(mlp(), data, spec_of(epochs=3))  # BatchNorm would fail on 1 example
    assert result.steps == 12 and {p.total_steps for p in hooks.progress} == {12}
    assert result.stopped_early is False

    result, hooks = train(mlp(), data, spec_of(epochs=3, max_steps=6))
    assert [p.step for p in hooks.progress] == [1, 2, 3, 4, 5, 6]
    assert {p.total_steps for p in hooks.progress} == {6}
    assert [end.epoch for end in hooks.ends] == [1, 2]  # the cut epoch still ends
    assert (result.steps, result.epochs_completed, result.stopped_early) == (6, 2, True)
    assert hooks.checks == 6


def _contrary_regression(n: int, val_split: float, seed: int) -> TrainData:
    """Validation targets are the negated training relation: learning makes val loss worse."""
    inputs, targets = linear_data(n)
    _, val_index = split_indices(n, val_split, seed)
    targets = targets - 0.5
    targets[val_index] = -targets[val_index]
    return TrainData({"x": inputs}, targets)


def test_early_stopping_keeps_the_best_epoch() -> None:
    module = _linear()
    with torch.no_grad():
        module.weight.zero_()
        module.bias.zero_()
    spec = spec_of(
        epochs=10, loss="mse", learning_rate=0.02, val_split=0.25, early_stopping_patience=2
    )
    result, hooks = train(module, _contrary_regression(40, 0.25, spec.seed), spec)
    assert [end.epoch for end in hooks.ends] == [1, 2, 3]
    assert [end.is_best for end in hooks.ends] == [True, False, False]
    val_losses = [end.val_loss for end in hooks.ends if end.val_loss is not None]
    assert val_losses == sorted(val_losses)  # worse and worse
    assert (result.best_epoch, result.best_val_loss) == (1, val_losses[0])
    assert (result.stopped_early, result.epochs_completed, result.val_loss) == (
        True,
        3,
        val_losses[2],
    )


def test_improving_validation_marks_every_epoch_best() -> None:
    spec = spec_of(epochs=4, val_split=0.25, early_stopping_patience=1)
    result, hooks = train(mlp(dropout=0.0), blobs(), spec)
    assert [end.is_best for end in hooks.ends] == [True] * 4
    assert (result.best_epoch, result.stopped_early) == (4, False)
    assert result.best_val_loss == hooks.ends[-1].val_loss


# --- determinism and resume ------------------------------------------------------------------

RESUME_SPEC = spec_of(
    epochs=3,
    optimizer="adam",
    learning_rate=0.01,
    schedule="cosine",
    warmup_steps=2,
    grad_clip_norm=1.0,
    val_split=0.25,
    early_stopping_patience=5,
    seed=3,
)


def test_same_seed_gives_bitwise_identical_weights() -> None:
    first, _ = train(mlp(), blobs(), RESUME_SPEC)
    module = mlp()
    torch.rand(17)  # the global RNG elsewhere: fine_tune must reseed it from spec.seed
    second, _ = train(module, blobs(), RESUME_SPEC)
    assert_same(first.state_dict, second.state_dict)
    other, _ = train(mlp(), blobs(), dataclasses.replace(RESUME_SPEC, seed=4))
    assert not torch.equal(first.state_dict["layers.0.weight"], other.state_dict["layers.0.weight"])


def test_resume_after_an_epoch_matches_an_uninterrupted_run() -> None:
    full, hooks = train(mlp(), blobs(), RESUME_SPEC)
    epoch_one = hooks.ends[0]
    buffer = io.BytesIO()
    torch.save({"weights": epoch_one.state_dict, "resume": epoch_one.resume_state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert {"optimizer", "scheduler", "shuffle_rng_state", "torch_rng_state"} <= set(
        saved["resume"]
    )
    assert (saved["resume"]["epoch"], saved["resume"]["step"]) == (1, 6)

    module = mlp(seed=999)  # different initial weights: the checkpoint must bring them
    module.load_state_dict(saved["weights"])
    resumed, resumed_hooks = train(module, blobs(), RESUME_SPEC, resume=saved["resume"])
    assert_same(resumed.state_dict, full.state_dict)
    assert [end.epoch for end in resumed_hooks.ends] == [2, 3]
    assert [end.val_loss for end in resumed_hooks.ends] == [end.val_loss for end in hooks.ends[1:]]
    assert resumed_hooks.progress[0].step == 7
    assert (resumed.steps, resumed.epochs_completed) == (full.steps, full.epochs_completed)
    assert (resumed.best_epoch, resumed.best_val_loss) == (full.best_epoch, full.best_val_loss)


def test_resume_state_from_another_plan_is_refused() -> None:
    _, hooks = train(mlp(), blobs(), dataclasses.replace(RESUME_SPEC, epochs=1))
    with pytest.raises(InvalidInputError, match="resume state was made for 6 steps per epoch"):
        train(
            mlp(),
            blobs(),
            dataclasses.replace(RESUME_SPEC, batch_size=4),
            resume=hooks.ends[0].resume_state,
        )


def test_epoch_end_state_dict_is_a_cpu_copy_with_ties_kept() -> None:
    torch.manual_seed(6)
    module = TiedAutoencoder(features=8)
    inputs = torch.randn(32, 8)
    result, hooks = train(module, TrainData({"x": inputs}, inputs), spec_of(epochs=2, loss="mse"))
    first = hooks.ends[0].state_dict
    assert first["encoder.weight"] is first["decoder.weight"]
    assert first["encoder.weight"].data_ptr() != module.encoder.weight.data_ptr()
    assert not torch.equal(first["encoder.weight"], result.state_dict["encoder.weight"])
    assert_same(hooks.ends[1].state_dict, result.state_dict)


# --- cancellation and failures ---------------------------------------------------------------


def test_should_stop_cancels_before_the_next_step() -> None:
    before_stop = Recorder(stop_after=10)
    result, hooks = train(mlp(), blobs(), spec_of(epochs=3), hooks=before_stop)  # 8 steps/epoch
    assert (result.cancelled, result.stopped_early) == (True, False)
    assert (result.steps, result.epochs_completed) == (10, 1)
    assert [end.epoch for end in hooks.ends] == [1]
    assert hooks.progress[-1].step == 10
    assert hooks.checks == 11


class Faulty(nn.Module):
    """A linear model whose `fail_on`-th forward multiplies by `factor` or raises."""

    def __init__(self, fail_on: int, factor: float | None) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.calls, self.fail_on, self.factor = 0, fail_on, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.linear(x)
        if self.calls != self.fail_on:
            return out
        if self.factor is None:
            raise ValueError("user code broke")
        return out * self.factor


@pytest.mark.parametrize(("factor", "word"), [(math.nan, "NaN"), (math.inf, "infinite")])
def test_non_finite_loss_raises_naming_epoch_and_step(factor: float, word: str) -> None:
    torch.manual_seed(7)
    module = Faulty(fail_on=6, factor=factor)
    hooks = Recorder()
    with pytest.raises(TrainingError) as caught:
        train(module, regression(32), spec_of(epochs=3, loss="mse"), hooks)  # 4 steps/epoch
    assert str(caught.value) == f"loss became {word} at epoch 2, step 6"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [end.epoch for end in hooks.ends] == [1]


def test_forward_errors_propagate_unchanged() -> None:
    module = Faulty(fail_on=3, factor=None)
    with pytest.raises(ValueError) as caught:
        train(module, regression(32), spec_of(loss="mse"))
    assert caught.type is ValueError and str(caught.value) == "user code broke"
