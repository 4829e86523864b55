"""Large V2 JSON bodies decoded a slice at a time (rest_sliced.py) give exactly what one
decode of the whole body gives: the same values and dtypes, the same refusals."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.frontends.rest_http import json_object
from moduleserve.server.frontends.rest_infer import decode_request
from moduleserve.server.frontends.rest_sliced import DecodedArray, loads_sliced

PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=200)
SLICE = 16  # bytes per slice: a 100-value array is cut into dozens of slices

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-1000, 1000),
    st.floats(),  # NaN and infinities included: the stdlib's extension, still accepted
    st.booleans(),
)
FLAT = st.lists(NUMBERS, min_size=1, max_size=120) | st.lists(
    st.integers(0, 2**64), min_size=1, max_size=120
)
MIXED = st.lists(NUMBERS | st.text(max_size=3) | st.none(), min_size=1, max_size=60)
DATA = FLAT | st.lists(FLAT, max_size=4) | MIXED


def same(sliced: Any, plain: Any) -> bool:
    """`sliced` (from loads_sliced) holds what `plain` (one whole decode) holds."""
    if isinstance(sliced, DecodedArray):
        expected = np.asarray(plain)
        return sliced.values.dtype == expected.dtype and np.array_equal(
            sliced.values, expected, equal_nan=expected.dtype.kind == "f"
        )
    if isinstance(plain, dict):
        return sliced.keys() == plain.keys() and all(same(sliced[k], plain[k]) for k in plain)
    if isinstance(plain, list):
        return len(sliced) == len(plain) and all(map(same, sliced, plain))
    both_nan = isinstance(plain, float) and math.isnan(plain) and math.isnan(sliced)
    return both_nan or (type(sliced) is type(plain) and sliced == plain)


def cut_arrays(head: Any) -> int:
    inputs = head.get("inputs", [])
    return sum(isinstance(i, dict) and isinstance(i.get("data"), DecodedArray) for i in inputs)


@PROPERTY
@given(
    st.lists(DATA, min_size=1, max_size=3),
    st.sampled_from([None, 0, 2]),
    st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :\n")]),
    st.booleans(),
)
def test_sliced_decoding_equals_one_decode(
    arrays: list[Any], indent: int | None, separators: tuple[str, str], decoys: bool
) -> None:
    body: dict[str, Any] = {"inputs": [{"name": f"x{i}", "data": a} for i, a in enumerate(arrays)]}
    if decoys:  # "data" arrays that are not an input's data, and the text of one in a string
        body["id"] = '"data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]'
        body["parameters"] = {"data": arrays[0]}
        body["outputs"] = [{"name": "y", "data": arrays[-1]}]
    text = json.dumps(body, indent=indent, separators=separators).encode()
    sliced = loads_sliced(text, slice_bytes=SLICE)
    assert same(sliced, json_object(text))


@PROPERTY
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=40, max_size=80))
def test_long_flat_arrays_are_cut(values: list[float]) -> None:
    text = json.dumps({"inputs": [{"name": "x", "data": values}]}).encode()
    head = loads_sliced(text, slice_bytes=SLICE)
    assert cut_arrays(head) == 1 and same(head, json.loads(text))


@PROPERTY
@given(st.binary(max_size=40), st.integers(0, 400))
@example(b"]", 300)
@example(b"1,,", 300)
@example(b'"', 10)
def test_broken_bodies_are_refused_with_the_sentence_of_one_decode(junk: bytes, at: int) -> None:
    values = list(range(100))
    text = json.dumps({"inputs": [{"name": "x", "data": values}], "id": "r"}).encode()
    broken = text[:at] + junk + text[at:]
    try:
        expected: Any = json_object(broken)
    except InvalidInputError as err:
        with pytest.raises(InvalidInputError) as got:
            loads_sliced(broken, slice_bytes=SLICE)
        assert str(got.value) == str(err)
        return
    assert same(loads_sliced(broken, slice_bytes=SLICE), expected)


VALUES = ", ".join(str(v) for v in range(50))
MALFORMED = [
    f"[{VALUES}, 1, , 2]", f"[{VALUES},]", f"[{VALUES}, ]", f"[, {VALUES}]",
    f"[{VALUES} 1]", f"[{VALUES}, 1]]", f"[{VALUES}, 1e]", f"[{VALUES}, NaN, nan]",
    f"[{VALUES}, 0.{'9' * 40},]", f"[{VALUES}, 0.{'9' * 40}, ]",  # a trailing comma cut alone
]  # fmt: skip


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_arrays_are_refused_with_the_sentence_of_one_decode(data: str) -> None:
    text = f'{{"inputs": [{{"name": "x", "data": {data}}}]}}'.encode()
    with pytest.raises(InvalidInputError) as err:
        json_object(text)
    with pytest.raises(InvalidInputError) as got:
        loads_sliced(text, slice_bytes=SLICE)
    assert str(got.value) == str(err.value)


def test_repeated_data_keys_keep_the_last_as_one_decode_does() -> None:
    first, last = list(range(100)), [float(v) for v in range(100, 200)]
    text = f'{{"inputs": [{{"name": "x", "data": {first}, "data": {last}}}]}}'.encode()
    assert same(loads_sliced(text, slice_bytes=SLICE), json.loads(text))


def test_a_large_uint64_array_arrives_exact() -> None:
    # Past 2**63 numpy reads Python ints as float64: the exact check then needs the values.
    values = [v if v % 2 else 2**64 - v for v in range(1, 200_001)]
    body = json.dumps(
        {"inputs": [{"name": "u", "datatype": "UINT64", "shape": [len(values)], "data": values}]}
    ).encode()
    assert len(body) > 2 * 128 * 1024  # long enough to be cut at the server's slice size
    assert decode_request(body, None).inputs["u"].numpy().tolist() == values


def test_a_large_float_array_through_the_request_decoder() -> None:
    values = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [100_000], "data": values.tolist()}]}
    ).encode()
    assert len(body) > 2 * 128 * 1024
    assert cut_arrays(loads_sliced(body)) == 1
    np.testing.assert_array_equal(decode_request(body, None).inputs["x"].numpy(), values)
    bools = {"inputs": [{"name": "b", "datatype": "FP32", "shape": [100_000],
                         "data": [True] * 100_000}]}  # fmt: skip
    with pytest.raises(InvalidInputError, match="input 'b': FP32 data must be numbers"):
        decode_request(json.dumps(bools).encode(), None)
