"""A model's compute function checks what forward() returns against its class: a model that
breaks the contract fails its batch with a sentence naming the class, never a bare error.

Through the production path: `InputPlan.check`, then `DynamicBatcher.submit` over the
compute function `make_compute` builds from a real module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
import torch
from torch import nn

from moduleserve.registry.entities import ModuleClass, TensorSpec, Version
from moduleserve.server.engine.batcher import DynamicBatcher
from moduleserve.server.engine.devices import make_compute
from moduleserve.server.engine.plan import InputPlan
from moduleserve.server.errors import ModelOutputError

TIMEOUT = 2.0
NOW = datetime.now(UTC)
SUMMER = ModuleClass(
    "Summer",
    "tests.models:Summer",
    {},
    (TensorSpec("x", "float32", (-1, 2)),),
    (TensorSpec("y", "float32", (-1, 2)),),
    "",
    NOW,
)
VERSION = Version("summer", 1, "Summer", "0" * 64, 16, None, "upload", "", {}, {}, NOW)


class Returns(nn.Module):
    """forward() returns whatever `make` builds from the input."""

    def __init__(self, make: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.make = make

    def forward(self, x: torch.Tensor) -> object:
        return self.make(x)


async def answer(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One request to `module` served inline, as the engine serves it."""
    compute = make_compute(module, SUMMER, VERSION, torch.device("cpu"))
    batcher = DynamicBatcher("summer:1", compute, None, max_batch_size=8)  # type: ignore[arg-type]
    batcher.start()
    try:
        rows, signature = InputPlan("summer", SUMMER, 8).check({"x": x})
        return await asyncio.wait_for(batcher.submit({"x": x}, rows, signature), TIMEOUT)
    finally:
        await batcher.stop()


PREFIX = "model 'summer' version 1: its class 'Summer' "
CASES = [
    (
        lambda x: x.sum(dim=0, keepdim=True),
        "returned output 'y' with 1 row for a batch of 2; forward() must return one row per "
        "input row along dimension 0",
    ),
    (
        lambda x: x.sum(),
        "returned output 'y' with no rows for a batch of 2; forward() must return one row per "
        "input row along dimension 0",
    ),
    (lambda x: {"y": x}, "returned output 'y' as dict, not a tensor"),
    (lambda x: (x, x), "returned 2 tensors from forward(), but declares 1 output (y)"),
]


@pytest.mark.parametrize(("make", "reason"), CASES, ids=["rows", "scalar", "dict", "count"])
@pytest.mark.asyncio
async def test_outputs_that_break_the_class_contract_are_a_model_output_error(
    make: Callable[[torch.Tensor], object], reason: str
) -> None:
    with pytest.raises(ModelOutputError) as err:
        await answer(Returns(make), torch.ones(2, 2))
    assert str(err.value) == PREFIX + reason
    assert (err.value.model, err.value.class_name) == ("summer", "Summer")


@pytest.mark.asyncio
async def test_outputs_with_one_row_per_input_row_pass() -> None:
    result = await answer(Returns(lambda x: x * 2), torch.ones(2, 2))
    assert result["y"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
