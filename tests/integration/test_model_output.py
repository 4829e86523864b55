"""A model whose outputs break its class's contract (here: not one row per input row) is the
model author's fault, named as such: FAILED_PRECONDITION (HTTP 400) with a sentence naming
the class, the output and the rows, never INTERNAL; the server goes on serving."""

from __future__ import annotations

import http.client
import json
from typing import Any

import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import FailedPreconditionError
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from tests.helpers import EnvoyServer
from tests.models import DropsLastRow

SENTENCE = (
    "model 'droplast' version 1: its class 'DropsLastRow' returned output '{output}' with 2 "
    "rows for a batch of 3; forward() must return one row per input row along dimension 0"
)


@pytest.fixture
def droplast(demo_registry: Registry) -> str:
    """The output's name (the registry derived it from the class)."""
    demo_registry.classes.register(
        "DropsLastRow", "tests.models:DropsLastRow", {}, [parse_input_spec("x:float32:-1,2")]
    )
    torch.manual_seed(3)
    demo_registry.push("droplast", DropsLastRow().state_dict(), class_name="DropsLastRow")
    version = demo_registry.checkpoints.resolve("droplast")
    return demo_registry.module_class_of(version).outputs[0].name


def test_outputs_without_one_row_per_input_row_are_failed_precondition(
    served: Any, demo_registry: Registry, droplast: str
) -> None:
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    with ModelClient(served.target) as client:
        with pytest.raises(FailedPreconditionError) as err:
            client.infer("droplast", rows)
        assert str(err.value) == SENTENCE.format(output=droplast)
        assert client.health() == "SERVING"
        # Batches it can answer still work, exactly.
        one = client.infer("droplast", rows[:1])
    with torch.no_grad():
        expected = demo_registry.load_module("droplast").linear(torch.from_numpy(rows[:1]))
    np.testing.assert_allclose(one, expected.numpy(), rtol=1e-6)
    if isinstance(served, EnvoyServer):  # and over V2 REST
        body = {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [0] * 6}]}
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        try:
            connection.request("POST", "/v2/models/droplast/infer", json.dumps(body))
            response = connection.getresponse()
            status, answer = response.status, json.loads(response.read())
        finally:
            connection.close()
        assert (status, answer) == (400, {"error": SENTENCE.format(output=droplast)})
