"""InputPlan: the per-model checks parsed at load give the same answers and the same error
sentences on the fast path as the full check followed by the batcher's merge key."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from datetime import UTC, datetime

import pytest
import torch

from moduleserve.registry.entities import ModuleClass, TensorSpec
from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.engine.batcher import signature_of
from moduleserve.server.engine.plan import InputPlan
from moduleserve.server.errors import InvalidTensorError


def module_class(*inputs: TensorSpec) -> ModuleClass:
    outputs = (TensorSpec("y", "float32", (-1, 10)),)
    return ModuleClass("C", "m:C", {}, inputs, outputs, "", datetime.now(UTC))


SINGLE = module_class(TensorSpec("x", "float32", (-1, 3, 8, 8)))
FREE = module_class(TensorSpec("x", "float32", (-1, 3, -1)))
PAIR = module_class(TensorSpec("a", "int64", (-1,)), TensorSpec("b", "float32", (-1, 2)))


def reference(cls: ModuleClass, inputs: Mapping[str, torch.Tensor]) -> tuple[int, Hashable]:
    """The full check of every request, then the batcher's merge key."""
    InputPlan("m", cls, 4).check_slow(inputs)
    return signature_of(inputs)


def outcome(check: object, cls: ModuleClass, inputs: Mapping[str, torch.Tensor]) -> object:
    try:
        return check(cls, inputs)  # type: ignore[operator]
    except InvalidInputError as exc:
        return (type(exc), str(exc))


CASES = [
    (SINGLE, {"x": torch.zeros(1, 3, 8, 8)}),
    (SINGLE, {"x": torch.zeros(4, 3, 8, 8)}),
    (SINGLE, {"x": torch.zeros(5, 3, 8, 8)}),  # past max_batch_size
    (SINGLE, {"x": torch.zeros(0, 3, 8, 8)}),  # empty
    (SINGLE, {"x": torch.zeros(1, 3, 8, 8, dtype=torch.float64)}),
    (SINGLE, {"x": torch.zeros(1, 3, 8)}),
    (SINGLE, {"x": torch.zeros(1, 3, 8, 9)}),
    (SINGLE, {"x": torch.zeros(())}),
    (SINGLE, {"z": torch.zeros(1, 3, 8, 8)}),
    (SINGLE, {"x": torch.zeros(1, 3, 8, 8), "z": torch.zeros(1)}),
    (SINGLE, {}),
    (FREE, {"x": torch.zeros(2, 3, 5)}),
    (FREE, {"x": torch.zeros(2, 4, 5)}),
    (PAIR, {"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(2, 2)}),
    (PAIR, {"b": torch.zeros(2, 2), "a": torch.zeros(2, dtype=torch.int64)}),
    (PAIR, {"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(3, 2)}),
    (PAIR, {"a": torch.zeros(2, dtype=torch.int64)}),
]


@pytest.mark.parametrize(("cls", "inputs"), CASES)
def test_plan_matches_the_full_check(cls: ModuleClass, inputs: Mapping[str, torch.Tensor]) -> None:
    def planned(c: ModuleClass, i: Mapping[str, torch.Tensor]) -> tuple[int, Hashable]:
        return InputPlan("m", c, 4).check(i)

    assert outcome(planned, cls, inputs) == outcome(reference, cls, inputs)


def test_requests_of_the_fast_and_full_paths_merge() -> None:
    # The fast path's precomputed merge key equals the one signature_of computes.
    plan = InputPlan("m", SINGLE, 4)
    fast = plan.check({"x": torch.zeros(2, 3, 8, 8)})
    assert fast == signature_of({"x": torch.zeros(2, 3, 8, 8)})


def test_unknown_requested_output_sentence() -> None:
    with pytest.raises(InvalidInputError) as err:
        InputPlan("m", SINGLE, 4).check_requested(["y", "logits"])
    assert str(err.value) == (
        "requested output 'logits' is not an output of model 'm' (outputs: y)"
    )


def test_a_request_larger_than_max_batch_size_is_refused() -> None:
    with pytest.raises(InvalidTensorError) as err:
        InputPlan("m", SINGLE, 2).check({"x": torch.zeros(3, 3, 8, 8)})
    assert str(err.value) == "input 'x': has 3 rows, more than model 'm''s max_batch_size 2"


def test_inputs_must_agree_on_dimension_zero() -> None:
    with pytest.raises(InvalidTensorError) as err:
        InputPlan("m", PAIR, 4).check(
            {"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(3, 2)}
        )
    assert str(err.value) == "input 'b': has 3 rows, but input 'a' has 2"


def test_a_scalar_is_refused_where_the_spec_has_a_batch_dimension() -> None:
    with pytest.raises(InvalidTensorError) as err:
        InputPlan("m", SINGLE, 4).check({"x": torch.tensor(1.0)})
    assert str(err.value) == "input 'x': expected shape [-1, 3, 8, 8], got []"
