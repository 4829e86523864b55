"""The V2 REST inference codec as pure functions: JSON and binary inputs, outputs, refusals."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.dataplane import InferResult
from moduleserve.server.frontends.rest_infer import (
    ENCODE_SLICE,
    InferRequest,
    decode_request,
    encode_response,
)


def body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def tensor(name: str = "x", datatype: str = "FP32", shape: Any = (2, 2), **kw: Any) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), **kw}


def binary(head: dict[str, Any], *parts: bytes) -> tuple[bytes, str]:
    header = json.dumps(head).encode()
    return header + b"".join(parts), str(len(header))


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP32", [[1, 2.5], [3, 4]], torch.tensor([[1, 2.5], [3, 4]], dtype=torch.float32)),
        ("FP64", [1, 2, 3, 4], torch.tensor([[1, 2], [3, 4]], dtype=torch.float64)),
        ("INT8", [-128, 127, 0, 1], torch.tensor([[-128, 127], [0, 1]], dtype=torch.int8)),
        ("UINT64", [2**64 - 1, 0, 1, 2**63 + 1], None),
        ("BOOL", [[True, False], [False, True]], torch.tensor([[True, False], [False, True]])),
    ],
)
def test_json_data_flat_or_nested(datatype: str, data: Any, expected: torch.Tensor | None) -> None:
    decoded = decode_request(body(tensor(datatype=datatype, data=data)), None)
    got = decoded.inputs["x"]
    if expected is None:  # torch has no uint64 comparisons: compare numpy's exact values
        assert got.numpy().ravel().tolist() == data
        return
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize(
    ("item", "sentence"),
    [
        (tensor(data=[[1, 2], [3]]), "input 'x': 'data' is ragged"),
        (tensor(data=[1, 2, 3]), "input 'x': expected 4 FP32 values for shape [2, 2], got 3"),
        (tensor(data=1.0), "input 'x': 'data' must be a JSON array"),
        (tensor(data=[None] * 4), "input 'x': FP32 data must be numbers"),
        (tensor("b", "BOOL", data=[1, 0, 1, 0]), "input 'b': BOOL data must be true or false"),
        (tensor("i", "INT32", data=[1.5, 2, 3, 4]), "input 'i': INT32 data must be integers"),
        (tensor("i", "UINT8", data=[256, 0, 0, 0]), "a value is out of range for UINT8 (0 to 255)"),
        (tensor("u", "UINT64", data=[-1, 0, 0, 0]), "a value is out of range for UINT64"),
        (tensor("u", "UINT64", data=[2**64, 0, 0, 0]), "a value is out of range for UINT64"),
        (tensor("u", "INT64", data=[2**63, 0, 0, 0]), "a value is out of range for INT64"),
        (tensor("u", "UINT64", data=[2**63, 0.5, 0, 0]), "UINT64 data must be integers"),
        (tensor("h", "FP16", data=[1, 2, 3, 4]), "datatype FP16 cannot be sent as JSON numbers"),
        (tensor("h", "BF16", data=[1, 2, 3, 4]), "send it as binary data"),
        (tensor("s", "BYTES", data=["a"] * 4), "datatype BYTES is not supported by this model"),
        (tensor("t", "FLOAT", data=[1] * 4), "input 't': unknown datatype 'FLOAT'"),
        (tensor(shape=[2, -1], data=[]), "shape [2, -1] has a negative dimension"),
        (tensor(shape=[2, True], data=[]), "input 'x': needs a 'shape' array of integers"),
        (tensor(shape=[2, 2]), "input 'x': has no 'data' and no 'binary_data_size' parameter"),
        ({"datatype": "FP32"}, "each entry of 'inputs' needs a 'name' string"),
        ({"name": "x", "shape": [1]}, "input 'x': needs a 'datatype' string"),
        ("x", "each entry of 'inputs' must be a JSON object"),
    ],
)
def test_json_data_refused_with_a_sentence(item: Any, sentence: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        decode_request(body(item), None)
    assert sentence in str(err.value)


def test_empty_tensor_and_duplicate_inputs() -> None:
    empty = decode_request(body(tensor(shape=[0, 2], data=[])), None).inputs["x"]
    assert empty.shape == (0, 2) and empty.dtype == torch.float32
    with pytest.raises(InvalidInputError, match="input 'x': appears more than once"):
        decode_request(body(tensor(data=[1] * 4), tensor(data=[1] * 4)), None)


def test_binary_inputs_in_order_mixed_with_json() -> None:
    a = np.arange(4, dtype=np.float32)
    b = np.array([True, False, True])
    head = {
        "inputs": [
            tensor("a", parameters={"binary_data_size": 16}),
            tensor("j", "INT64", [1], data=[7]),
            tensor("b", "BOOL", [3], parameters={"binary_data_size": 3}),
        ]
    }
    data, length = binary(head, a.tobytes(), b.tobytes())
    inputs = decode_request(data, length).inputs
    assert inputs["a"].tolist() == [[0, 1], [2, 3]]
    assert inputs["j"].tolist() == [7] and inputs["b"].tolist() == [True, False, True]


def test_fp16_and_bf16_come_binary() -> None:
    h = torch.tensor([1.5, -2.0], dtype=torch.float16)
    bf = torch.tensor([0.5, 3.0], dtype=torch.bfloat16)
    head = {
        "inputs": [
            tensor("h", "FP16", [2], parameters={"binary_data_size": 4}),
            tensor("bf", "BF16", [2], parameters={"binary_data_size": 4}),
        ]
    }
    data, length = binary(head, h.numpy().tobytes(), bf.view(torch.int16).numpy().tobytes())
    inputs = decode_request(data, length).inputs
    assert torch.equal(inputs["h"], h) and torch.equal(inputs["bf"], bf)


@pytest.mark.parametrize(
    ("size", "extra", "length", "sentence"),
    [
        (16, b"", "x", "the Inference-Header-Content-Length header must be a whole number from 0"),
        (16, b"", "0", "raw binary request (Inference-Header-Content-Length: 0) is not supported"),
        (16, b"", "99999", "says 99999 bytes, but the body has only"),
        (12, b"", None, "expected 16 bytes of FP32 data for shape [2, 2], got 12"),
        (32, b"", None, "binary_data_size is 32, but only 16 bytes of binary data are left"),
        (16, b"more", None, "holds 20 bytes of binary data after its JSON header"),
        (
            -1,
            b"",
            None,
            "input 'x': parameter 'binary_data_size' must be a whole number from 0 "
            "to 9223372036854775807, got -1",
        ),
        (
            "16",
            b"",
            None,
            "parameter 'binary_data_size' must be a whole number from 0 to "
            "9223372036854775807, got '16'",
        ),
    ],
)
def test_binary_inputs_refused_with_a_sentence(
    size: Any, extra: bytes, length: str | None, sentence: str
) -> None:
    head = {"inputs": [tensor(parameters={"binary_data_size": size})]}
    data, real_length = binary(head, np.zeros(4, np.float32).tobytes(), extra)
    with pytest.raises(InvalidInputError) as err:
        decode_request(data, length or real_length)
    assert sentence in str(err.value)


def test_both_data_and_binary_is_refused() -> None:
    head = {"inputs": [tensor(data=[1] * 4, parameters={"binary_data_size": 16})]}
    data, length = binary(head, bytes(16))
    with pytest.raises(InvalidInputError, match="has both 'data' and binary_data_size"):
        decode_request(data, length)


def test_request_parameters_and_outputs() -> None:
    extra = {
        "id": "r1",
        "parameters": {"binary_data_output": True, "priority": 2, "timeout": 5_000_000},
        "outputs": [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
    }
    request = decode_request(body(tensor(data=[1] * 4), **extra), None)
    assert (request.id, request.priority, request.requested) == ("r1", 2, ["a", "b"])
    assert request.binary_default and request.binary_outputs == {"a": False}
    assert request.deadline is not None
    assert decode_request(body(tensor(data=[1] * 4)), None).deadline is None


@pytest.mark.parametrize(
    ("extra", "sentence"),
    [
        ({"id": 3}, "the request's 'id' must be a string"),
        (
            {"parameters": {"priority": 1.5}},
            "the request: parameter 'priority' must be a whole "
            "number from 0 to 18446744073709551615, got 1.5",
        ),
        ({"parameters": {"binary_data_output": 1}}, "'binary_data_output' must be true or false"),
        ({"parameters": []}, "the request's 'parameters' must be a JSON object"),
        ({"outputs": {}}, "the request's 'outputs' must be a JSON array"),
        ({"outputs": [{}]}, "each entry of 'outputs' needs a 'name' string"),
        ({"outputs": [{"name": "o", "parameters": {"binary_data": "yes"}}]}, "output 'o'"),
    ],
)
def test_request_fields_refused_with_a_sentence(extra: dict[str, Any], sentence: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        decode_request(body(tensor(data=[1] * 4), **extra), None)
    assert sentence in str(err.value)


def test_encode_json_binary_and_forced_binary_outputs() -> None:
    outputs = {
        "f": torch.tensor([[1.0, 2.0]]),
        "m": torch.tensor([True, False]),
        "h": torch.tensor([1.5], dtype=torch.float16),  # no JSON form: binary regardless
        "bf": torch.tensor([2.0], dtype=torch.bfloat16),
        "i": torch.tensor([3], dtype=torch.int64),
    }
    request = InferRequest({}, id="r", binary_outputs={"i": True})
    parts, length = encode_response("m", request, InferResult("m", 4, outputs))
    header = b"".join(parts[:-3])  # the JSON header, in pieces; then three binary outputs
    head = json.loads(header)
    assert len(header) == length
    assert head["model_name"] == "m" and head["model_version"] == "4" and head["id"] == "r"
    by_name = {o["name"]: o for o in head["outputs"]}
    assert by_name["f"] == {"name": "f", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}
    assert by_name["m"]["data"] == [True, False] and by_name["m"]["datatype"] == "BOOL"
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"] if "parameters" in o]
    assert sizes == [2, 2, 8] and [o["name"] for o in head["outputs"]] == list(outputs)
    assert parts[-3] == outputs["h"].numpy().tobytes()
    assert parts[-2] == outputs["bf"].view(torch.int16).numpy().tobytes()
    assert parts[-1] == np.int64(3).tobytes()


def test_large_outputs_are_written_in_slices_with_nan_and_infinities_kept() -> None:
    values = torch.arange(3 * ENCODE_SLICE + 5, dtype=torch.float32) / 7
    values[ENCODE_SLICE + 1] = float("nan")
    values[-1], values[-2] = float("inf"), float("-inf")
    integers = torch.arange(ENCODE_SLICE + 3, dtype=torch.int64) - 10
    outputs = {"f": values, "i": integers, "empty": torch.zeros(0)}
    parts, length = encode_response("m", InferRequest({}), InferResult("m", 1, outputs))
    header = b"".join(parts)
    assert len(header) == length
    by_name = {o["name"]: o for o in json.loads(header)["outputs"]}
    assert by_name["i"]["data"] == integers.tolist() and by_name["empty"]["data"] == []
    np.testing.assert_array_equal(np.array(by_name["f"]["data"], np.float32), values.numpy())
    assert b"NaN" in header and b"-Infinity" in header  # as the stdlib writes them, not null
