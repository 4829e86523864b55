"""The one parser of client numbers (registry/numbers.py), property-tested through every
input that reaches it: arbitrary text or JSON raises nothing but InvalidInputError, ASCII
decimal text reads back as its value, and other scripts' digits are refused."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.introspect import parse_slices
from moduleserve.registry.names import MAX_VERSION, parse_ref
from moduleserve.registry.numbers import (
    INT64_MAX,
    INT64_MIN,
    UINT64_MAX,
    InvalidNumberError,
    json_int,
    parse_int,
)
from moduleserve.server.frontends.rest_http import HttpError, read_body
from moduleserve.server.frontends.rest_infer import decode_request

# Deterministic: the same examples on every run and machine, no example database.
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=300)

# Characters that are digits to str.isdigit() or int() but not ASCII: '²', '٣', and more.
OTHER_DIGITS = st.characters(categories=["Nd", "No"], exclude_characters="0123456789")
ASCII_DIGITS = st.sampled_from("0123456789")


def with_other_digit(draw: st.DrawFn) -> str:
    """ASCII digits with at least one other script's digit among them."""
    digits = draw(st.lists(ASCII_DIGITS, max_size=6))
    digits.insert(draw(st.integers(0, len(digits))), draw(OTHER_DIGITS))
    return "".join(digits)


non_ascii_numbers = st.composite(with_other_digit)()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
RANGES = [(0, INT64_MAX), (1, MAX_VERSION), (INT64_MIN, INT64_MAX), (0, UINT64_MAX)]


# --- the parser itself ---


@PROPERTY
@given(st.text(), st.sampled_from(RANGES))
@example("²", (0, INT64_MAX))
@example("1_000", (0, INT64_MAX))
@example("9" * 5000, (0, INT64_MAX))
def test_any_text_is_a_number_in_range_or_invalid_number_error(
    text: str, bounds: tuple[int, int]
) -> None:
    low, high = bounds
    try:
        value = parse_int(text, "the thing", low, high)
    except InvalidNumberError as err:
        assert str(err).startswith("the thing must be ") and "\n" not in str(err)
        return
    assert low <= value <= high and text.lstrip("+-").isascii()


@PROPERTY
@given(st.data())
def test_ascii_decimal_text_reads_back(data: st.DataObject) -> None:
    low, high = data.draw(st.sampled_from(RANGES))
    value = data.draw(st.integers(low, high))
    zeros = data.draw(st.integers(0, 3))
    sign = "-" if value < 0 else data.draw(st.sampled_from(["", "+"])) if low < 0 else ""
    assert parse_int(f"{sign}{'0' * zeros}{abs(value)}", "n", low, high) == value


@PROPERTY
@given(non_ascii_numbers, st.sampled_from(RANGES))
@example("٣", (0, INT64_MAX))
@example("1¹", (0, INT64_MAX))
def test_other_scripts_digits_are_refused(text: str, bounds: tuple[int, int]) -> None:
    with pytest.raises(InvalidNumberError, match="must be"):
        parse_int(text, "n", *bounds)


@pytest.mark.parametrize(
    ("text", "low", "sentence"),
    [
        ("-1", 0, "n must be a whole number from 0 to 9223372036854775807, got '-1'"),
        ("+1", 0, "got '+1'"),
        (" 1", 0, "got ' 1'"),
        ("1 ", 0, "got '1 '"),
        ("", 0, "got ''"),
        ("9223372036854775808", 0, "got '9223372036854775808'"),
        ("-9223372036854775809", INT64_MIN, "n must be an integer from -9223372036854775808"),
        ("0" * 65 + "1", 0, "got '000000000000000000000000000000000000000…'"),
        ("1\n", 0, "got '1?'"),
    ],
)
def test_refusals_say_what_and_the_range(text: str, low: int, sentence: str) -> None:
    with pytest.raises(InvalidNumberError) as err:
        parse_int(text, "n", low)
    assert sentence in str(err.value)


@PROPERTY
@given(JSON_VALUES)
@example(True)
@example(2.0)
@example(10**5000)
def test_json_int_takes_integers_only(value: Any) -> None:
    try:
        got = json_int(value, "parameter 'p'", 0, UINT64_MAX)
    except InvalidNumberError as err:
        assert "parameter 'p' must be a whole number" in str(err) and len(str(err)) < 200
        assert type(value) is not int or not 0 <= value <= UINT64_MAX
        return
    assert type(value) is int and got == value


# --- each input that reaches it ---


def read(headers: list[tuple[bytes, bytes]], body: bytes = b"{}") -> bytes | None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return asyncio.run(read_body({"headers": headers}, receive, 1000))


@PROPERTY
@given(st.binary(max_size=24))
@example("²".encode("latin-1"))
@example("1¹".encode("latin-1"))
def test_content_length_header(value: bytes) -> None:
    try:
        assert read([(b"content-length", value)]) == b"{}"
    except HttpError as err:  # a well-formed length over the limit
        assert err.status == 413 and int(value.strip(b" \t")) > 1000
    except InvalidInputError as err:
        assert str(err).startswith("the Content-Length header must be a whole number")
        assert not value.strip(b" \t").isdigit() or int(value) > INT64_MAX


def infer_body(header: bytes = b"") -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    return json.dumps({"inputs": [tensor]}).encode() + header


@PROPERTY
@given(st.binary(max_size=24).map(lambda b: b.decode("latin-1")))
@example("²")
@example("1¹")
@example("٣")
def test_inference_header_content_length(value: str) -> None:
    digits = value.strip(" \t")
    ascii_number = digits.isascii() and digits.isdigit() and len(digits) <= 19
    try:
        request = decode_request(infer_body(), value)
    except InvalidInputError as err:  # a valid length may still cut the JSON short
        if not ascii_number:
            assert "Inference-Header-Content-Length header must be a whole number" in str(err)
        return
    assert ascii_number and int(digits) == len(infer_body())
    assert request.inputs["x"].tolist() == [1.0]


@PROPERTY
@given(st.integers(1, 2**40), st.integers(0, 3))
def test_inference_header_content_length_reads_ascii_digits(extra: int, zeros: int) -> None:
    head = infer_body()
    length = "0" * zeros + str(len(head))
    assert decode_request(head, length).inputs["x"].tolist() == [1.0]
    with pytest.raises(InvalidInputError, match="the body has only"):
        decode_request(head, str(len(head) + extra))


@PROPERTY
@given(st.text(max_size=24))
@example("²")
@example("٣")
@example("1" * 5000)
def test_version_refs(text: str) -> None:
    try:
        ref = parse_ref(text)
    except InvalidInputError as err:
        assert str(err).startswith("invalid version")
        return
    assert ref == "" if not text else isinstance(ref, str) or (1 <= ref <= MAX_VERSION)
    assert text.isascii()


@PROPERTY
@given(st.integers(1, MAX_VERSION), non_ascii_numbers)
def test_version_refs_read_ascii_and_refuse_other_digits(version: int, other: str) -> None:
    assert parse_ref(str(version)) == version
    with pytest.raises(InvalidInputError, match="invalid version"):
        parse_ref(other)
    with pytest.raises(InvalidInputError, match="invalid version"):
        parse_ref(True)  # JSON true is not version 1


@PROPERTY
@given(st.text(max_size=24))
@example("٣")
@example("0:٣")
def test_slices(text: str) -> None:
    try:
        index = parse_slices(text, (5, 5))
    except InvalidInputError as err:
        assert str(err).startswith("invalid slice")
        return
    assert isinstance(index, tuple) and text.isascii()


@PROPERTY
@given(st.integers(-5, 4), non_ascii_numbers)
def test_slices_read_ascii_and_refuse_other_digits(index: int, other: str) -> None:
    assert parse_slices(str(index), (5,)) == (index,)
    with pytest.raises(InvalidInputError, match="is not an integer"):
        parse_slices(other, (10**9,))


def with_json(dims: Any = (1,), **params: Any) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(dims), "data": [1.0]}
    return json.dumps({"inputs": [tensor], "parameters": params}).encode()


@PROPERTY
@given(JSON_VALUES, st.sampled_from(["shape", "priority", "timeout", "binary_data_size"]))
@example(True, "priority")
@example(2.0, "timeout")
@example(10**400, "timeout")
@example(True, "shape")
def test_json_integers_in_a_request(value: Any, place: str) -> None:
    if place == "shape":
        body = with_json(dims=[value])
    elif place == "binary_data_size":
        tensor = {"name": "x", "datatype": "FP32", "shape": [1]}
        tensor["parameters"] = {"binary_data_size": value}
        body = json.dumps({"inputs": [tensor]}).encode()
    else:
        body = with_json(**{place: value})
    try:
        request = decode_request(body, None)
    except InvalidInputError:
        return
    assert type(value) is int  # nothing but a JSON integer was taken
    assert request.priority == (value if place == "priority" else 0)


X = '{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}'
HUGE_INTEGER_BODIES = [
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [N], "data": [1.0]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [N]}]}',
    '{"inputs": [X], "parameters": {"priority": N}}',
    '{"inputs": [X], "parameters": {"timeout": N}}',
    '{"inputs": [X], "id": N}',
]


@pytest.mark.parametrize("template", HUGE_INTEGER_BODIES)
def test_integers_past_the_digit_limit_are_refused_with_a_sentence(template: str) -> None:
    # int() refuses more than 4,300 digits with a ValueError that used to become a 500.
    text = template.replace("X", X).replace("N", "9" * 5000)
    with pytest.raises(InvalidInputError, match="holds an integer of more than 4300 digits"):
        decode_request(text.encode(), None)


@PROPERTY
@given(st.integers(0, UINT64_MAX))
def test_json_integer_parameters_read_back(value: int) -> None:
    assert decode_request(with_json(priority=value), None).priority == value
    assert (decode_request(with_json(timeout=value), None).deadline is None) == (value == 0)
