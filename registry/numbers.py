"""The one reader of integers that arrive from outside: header values, path segments,
version refs, introspection slices, and integers in JSON bodies.

`str.isdigit()` and `int()` accept more than a client means: `'²'.isdigit()` is True and
then `int('²')` raises, `int('٣')` is 3 (an Arabic-Indic digit), `int('1_000')` is 1000,
`int(' 7 ')` is 7, and `int()` of 5,000 digits raises ValueError. Here a number is ASCII
digits, a sign only where the caller allows negative values, bounded in length and value,
and anything else is an `InvalidNumberError` whose sentence names what was being read.
"""

from __future__ import annotations

import re
from typing import Any

from moduleserve.registry.errors import InvalidInputError, shorten

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1

MAX_CHARS = 64
"""Longest text read as a number: room for leading zeros, far below int()'s digit limit."""

QUOTED_CHARS = 40
"""What a sentence quotes of the refused text."""

# [0-9], not \d: in a str pattern \d also matches every other script's digits.
_UNSIGNED = re.compile(r"[0-9]+")
_SIGNED = re.compile(r"[+-]?[0-9]+")


class InvalidNumberError(InvalidInputError):
    """Text or a JSON value that is not an integer in the range its place allows."""

    def __init__(self, what: str, given: object, low: int, high: int) -> None:
        kind = "a whole number" if low >= 0 else "an integer"
        shown = repr(shorten(given, QUOTED_CHARS)) if isinstance(given, str) else _json(given)
        super().__init__(f"{what} must be {kind} from {low} to {high}, got {shown}")
        self.what, self.given, self.low, self.high = what, given, low, high


def parse_int(text: str, what: str, low: int = 0, high: int = INT64_MAX) -> int:
    """The integer `text` spells in ASCII digits, between `low` and `high`.

    A leading '+' or '-' is read only when `low` is negative; no spaces, underscores or
    other characters. `what` names the thing for the error sentence ("the Content-Length
    header")."""
    pattern = _SIGNED if low < 0 else _UNSIGNED
    if not isinstance(text, str) or len(text) > MAX_CHARS or not pattern.fullmatch(text):
        raise InvalidNumberError(what, text, low, high)
    value = int(text)
    if not low <= value <= high:
        raise InvalidNumberError(what, text, low, high)
    return value


def is_json_int(value: Any) -> bool:
    """True for a JSON integer: an int that is not a bool (JSON true is not 1), and not a
    float, even 2.0 (an integer field takes integers; the sender chose a fraction)."""
    return type(value) is int


def json_int(value: Any, what: str, low: int = 0, high: int = INT64_MAX) -> int:
    """A JSON integer between `low` and `high`, or an InvalidNumberError naming `what`."""
    if not is_json_int(value) or not low <= value <= high:
        raise InvalidNumberError(what, value, low, high)
    return int(value)


def _json(value: object) -> str:
    """A JSON value as a sentence shows it: its type for containers, else shortened."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    if isinstance(value, int) and abs(value) >= 10**QUOTED_CHARS:
        return f"an integer of more than {QUOTED_CHARS} digits"  # str() stops at 4,300
    return shorten(value, QUOTED_CHARS)
