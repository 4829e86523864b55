"""Seed the demo registry: the example classes and deterministic checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.entities import Version

SEED = 20261126


@dataclass(frozen=True)
class DemoModel:
    """One demo model: its name, class registration and input spec."""

    model: str
    class_name: str
    import_path: str
    kwargs: dict[str, Any]
    inputs: tuple[str, ...]
    description: str


DEMO_MODELS = (
    DemoModel(
        "mynet",
        "MyNet",
        "moduleserve.registry.demo.models:MyNet",
        {},
        ("x:float32:-1,3,8,8",),
        "Conv2d(3,16,3) -> flatten -> Linear(576,10)",
    ),
    DemoModel(
        "nested",
        "Net",
        "moduleserve.registry.demo.models:Net",
        {"channels": 16, "num_classes": 10},
        ("x:float32:-1,3,8,8",),
        "two nested Blocks (Conv2d, BatchNorm2d, ReLU) and a head",
    ),
    DemoModel(
        "mlp",
        "MLP",
        "moduleserve.registry.demo.models:MLP",
        {"in_features": 784, "hidden": [128], "out_features": 10, "dropout": 0.2},
        ("x:float32:-1,784",),
        "Linear, BatchNorm1d, ReLU, Dropout, Linear",
    ),
)


def seed_demo(registry: Registry) -> list[Version]:
    """Register the demo classes and push one seeded version of each model (idempotent)."""
    existing = {model.name for model in registry.checkpoints.list_models()}
    known = {cls.name for cls in registry.classes.list()}
    pushed = []
    for index, demo in enumerate(DEMO_MODELS):
        if demo.class_name not in known:
            specs = [parse_input_spec(text) for text in demo.inputs]
            registry.classes.register(
                demo.class_name, demo.import_path, demo.kwargs, specs, demo.description
            )
        if demo.model in existing:
            continue
        module_class = registry.classes.get(demo.class_name)
        torch.manual_seed(SEED + index)
        module = registry.classes.build(module_class, device="cpu")
        _settle_batch_norm(module, module_class.inputs[0].shape)
        pushed.append(
            registry.push(
                demo.model,
                module.state_dict(),
                class_name=demo.class_name,
                alias="production",
                source="demo",
                description=f"seeded demo checkpoint (seed {SEED + index})",
                actor="moduleserve-registry demo",
            )
        )
    return pushed


def _settle_batch_norm(module: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
    """A few train-mode forwards so BatchNorm running statistics are not the trivial 0/1."""
    shape = [32 if d == -1 else d for d in input_shape]
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(shape))
    module.eval()
