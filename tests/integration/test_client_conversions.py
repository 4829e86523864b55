"""ModelClient.infer takes what numpy users pass: other dtypes and lists are cast to the
model's, batches past max_batch_size are split and joined, shapes that cannot fit are
refused naming the shape given, and the version that answered can be returned."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import InvalidArgumentError
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import MyNet
from tests.helpers import ServerThread, server_settings
from tests.models import Doubler

ROWS = np.arange(10, dtype=np.float64).reshape(10, 1)  # float64, as numpy makes them


@pytest.fixture
def client(served: ServerThread) -> Iterator[ModelClient]:
    with ModelClient(served.target, timeout=30) as model_client:
        yield model_client
    with ModelClient(served.target) as check:
        assert check.health() == "SERVING"


@pytest.fixture
def small_batches(demo_registry: Registry) -> Iterator[ServerThread]:
    """A server whose doubler takes at most 4 rows per request."""
    settings = server_settings(
        demo_registry.settings.database_url(),
        demo_registry.settings.store,
        model_batching={"doubler": {"max_batch_size": 4}},
    )
    server = ServerThread(settings)
    yield server
    server.stop()


def test_float64_arrays_and_lists_become_the_models_dtype(client: ModelClient) -> None:
    for given in (ROWS[:2] + 4, [[4.0], [5.0]], [[4], [5]], torch.tensor([[4.0], [5.0]]).double()):
        result = client.infer("doubler", given)
        assert result.dtype in (np.float32, torch.float32)
        assert np.asarray(result).tolist() == [[9.0], [11.0]]
    assert client.infer("doubler", [4.0]).tolist() == [9.0]  # one sample, as a list


def test_conversion_can_be_turned_off(client: ModelClient) -> None:
    with pytest.raises(InvalidArgumentError, match="FP64"):
        client.infer("doubler", ROWS[:2], convert=False)


def test_values_that_do_not_fit_an_integer_input_are_refused(
    client: ModelClient, demo_registry: Registry
) -> None:
    demo_registry.classes.register(
        "IntDoubler", "tests.models:IntDoubler", {}, [parse_input_spec("x:int32:-1,1")]
    )
    demo_registry.push("ints", Doubler().state_dict(), class_name="IntDoubler")
    with pytest.raises(InvalidArgumentError, match=r"values from 0 to 4294967296 do not fit"):
        client.infer("ints", np.array([[0], [2**32]]))


def test_more_rows_than_max_batch_size_go_in_parts(small_batches: ServerThread) -> None:
    with ModelClient(small_batches.target, timeout=30) as client:
        result = client.infer("doubler", ROWS)
        assert result.tolist() == (2 * ROWS + 1).tolist()
        as_torch = client.infer("doubler", torch.from_numpy(ROWS.astype(np.float32)))
        assert isinstance(as_torch, torch.Tensor) and as_torch.shape == (10, 1)
        stats = client.statistics("doubler").model_stats[0]
        assert stats.inference_count == 20  # every row computed once
        assert stats.inference_stats.success.count == 6  # 4 + 4 + 2 rows, twice
        assert client.health() == "SERVING"


@pytest.mark.parametrize(
    ("model", "shape", "expected"),
    [
        ("doubler", (2,), "expected shape [-1, 1] (or [1] for one sample), got [2]"),
        (
            "mynet",
            (3, 8, 7),
            "expected shape [-1, 3, 8, 8] (or [3, 8, 8] for one sample), got [3, 8, 7]",
        ),
    ],
)
def test_a_sample_that_cannot_fit_is_refused_naming_its_shape(
    client: ModelClient, model: str, shape: tuple[int, ...], expected: str
) -> None:
    # Without the check, the batch dimension added to one sample showed in the server's
    # refusal: "got [1, 3, 8, 7]" for the [3, 8, 7] the caller passed.
    with pytest.raises(InvalidArgumentError) as caught:
        client.infer(model, np.zeros(shape, np.float32))
    assert str(caught.value) == f"input 'x' of model {model!r}: {expected}"


def test_other_shapes_are_refused_by_the_server_as_given(client: ModelClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.infer("mynet", np.zeros((2, 2), np.float32))
    assert str(caught.value) == "input 'x': expected shape [-1, 3, 8, 8], got [2, 2]"


def test_a_batch_too_big_and_misshapen_is_refused_before_splitting(
    small_batches: ServerThread,
) -> None:
    with ModelClient(small_batches.target, timeout=30) as client:
        with pytest.raises(InvalidArgumentError, match=r"got \[10, 2\]"):
            client.infer("doubler", np.zeros((10, 2), np.float32))
        assert client.health() == "SERVING"


def test_infer_says_which_version_answered(
    client: ModelClient, served: ServerThread, demo_registry: Registry
) -> None:
    x = np.zeros((3, 8, 8), np.float32)
    _, answered = client.infer("mynet", x, version="production", return_version=True)
    assert answered == "1"
    demo_registry.push("mynet", MyNet().state_dict(), class_name="MyNet", alias="production")
    deadline = time.monotonic() + 20  # the server re-reads aliases every 0.2 s in tests
    while answered == "1" and time.monotonic() < deadline:
        time.sleep(0.1)
        _, answered = client.infer("mynet", x, version="production", return_version=True)
    assert answered == "2"
    _, pinned = client.infer("mynet", x, version="1", return_version=True)
    assert pinned == "1"
