"""Large V2 JSON request bodies, decoded a slice at a time so that the event loop keeps
answering (health checks, other models) while they are read.

rest.py decodes a large body in a worker thread, but a thread alone frees nothing: a JSON
decoder holds the GIL for its whole call, so one call over a 60 MB body stalls the event
loop for as long as a decode on the loop would (measured: the loop's longest pause equals
the decode time). CPython hands the GIL over only between bytecodes, every
`sys.getswitchinterval()` (5 ms). So here each `"data": [...]` array that is large and flat
(numbers, no nested arrays) is cut out of the body and decoded in slices of SLICE_BYTES,
each one short C call, with Python code between them where the loop gets its turn.

The result is exactly what decoding the whole body at once gives, or the whole body is
decoded at once: a cut array whose slices do not all decode to the same numpy dtype, or
whose place in the body turns out not to be an input's `data`, is decoded the plain way,
and so is every body that is not valid JSON (its error then names the line and column).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.frontends.rest_http import json_object, parse_json

SLICE_BYTES = 128 * 1024
"""Bytes of one array decoded per call: about 1 ms of msgspec plus numpy on our machines.
Arrays shorter than two slices stay in the body (decoded with it in one call)."""

FIND_WINDOW = 8 * 1024 * 1024
"""Bytes searched per `bytes.find` call, so that a search holds the GIL briefly too."""

_DATA_KEY = b'"data"'
# `: [` after the key, with JSON's own whitespace; bounded, so a match is always short.
_OPEN_VALUE = re.compile(rb"[ \t\n\r]{0,64}:[ \t\n\r]{0,64}\[")


@dataclass
class DecodedArray:
    """A request input's `data` array, already decoded: `values` is what np.asarray(data)
    gives for the JSON array `raw` (1-D: only flat arrays are cut out)."""

    values: np.ndarray
    raw: memoryview

    def to_list(self) -> Any:
        """The array as JSON values, decoded whole (for the rare check that needs them)."""
        return parse_json(self.raw)


def yield_gil() -> None:
    """Between two slices of work in a worker thread: let a waiting thread (the event
    loop, or Envoy's calling into Python) take the GIL now. Unasked, CPython hands it over
    only after a waiter has waited `sys.getswitchinterval()` (5 ms), and one request needs
    it several times; a zero sleep releases it at once (measured: the loop's 90th
    percentile wait during a 60 MB decode fell from ~14 ms to ~4 ms, at no cost)."""
    time.sleep(0)


def loads_sliced(
    body: bytes, what: str = "the request body", slice_bytes: int = SLICE_BYTES
) -> dict[str, Any]:
    """`json_object(body)`, with each `data` array of `inputs` that is flat and at least
    two slices long decoded slice by slice and left in its place as a DecodedArray."""
    if len(body) < 2 * slice_bytes:
        return json_object(body, what)
    view = memoryview(body)
    # A key no client can know, so that no string in the body can pose as a cut array.
    nonce = secrets.token_hex(16)
    arrays: dict[str, DecodedArray] = {}
    parts: list[bytes | memoryview] = []
    done = 0
    for start, end in _flat_data_arrays(body, 2 * slice_bytes):
        values = _decode_flat(body, start, end, slice_bytes)
        if values is None:
            continue  # not plain numbers all of one kind: decoded with the rest
        key = f"{nonce}-{len(arrays)}"
        arrays[key] = DecodedArray(values, view[start:end])
        parts += [view[done:start], b'"%s"' % key.encode()]
        done = end
    if not arrays:
        return json_object(body, what)
    parts.append(view[done:])
    try:
        head = json_object(b"".join(parts), what)
    except InvalidInputError:
        return json_object(body, what)  # the error must name a place in the body sent
    if not _put_back(head, arrays):
        return json_object(body, what)
    return head


def _flat_data_arrays(body: bytes, min_bytes: int) -> list[tuple[int, int]]:
    """(start, end) of every `"data": [...]` array of at least `min_bytes` with no `[`
    inside. Found by byte search only: whether each really is an input's data is settled
    once the rest of the body has been decoded."""
    found: list[tuple[int, int]] = []
    at = _find(body, _DATA_KEY, 0, len(body))
    while at >= 0:
        after = at + len(_DATA_KEY)
        opened = _OPEN_VALUE.match(body, after)
        if opened is not None:
            start = opened.end() - 1
            close = _find(body, b"]", start, len(body))
            big = close - start >= min_bytes
            if close >= 0 and big and _find(body, b"[", start + 1, close) < 0:
                found.append((start, close + 1))
                after = close + 1
        at = _find(body, _DATA_KEY, after, len(body))
    return found


def _find(body: bytes, needle: bytes, start: int, stop: int) -> int:
    """`body.find(needle, start, stop)`, FIND_WINDOW bytes per call."""
    while start < stop:
        window = min(stop, start + FIND_WINDOW + len(needle) - 1)
        found = body.find(needle, start, window)
        if found >= 0:
            return found
        start += FIND_WINDOW
    return -1


def _decode_flat(body: bytes, start: int, end: int, slice_bytes: int) -> np.ndarray | None:
    """np.asarray of the JSON array body[start:end], decoded `slice_bytes` at a time and cut
    at commas (the array holds no strings, or the slices fail: a comma is always between
    two values; and with no `[` inside, each slice is 1-D). None unless every slice
    decodes to a non-empty array of booleans or numbers. Joined, the slices are then what
    np.asarray gives for the whole array: numpy promotes across arrays as it infers across
    one list (ints beside floats become float64, past 2**63 as well), which
    tests/unit/test_rest_sliced.py holds it to."""
    view = memoryview(body)
    slices: list[np.ndarray] = []
    pos, last = start + 1, end - 1  # inside the brackets
    while True:
        cut = body.find(b",", min(pos + slice_bytes, last), last)
        stop = last if cut < 0 else cut
        try:
            values = np.asarray(parse_json(b"".join((b"[", view[pos:stop], b"]"))))
        except (InvalidInputError, ValueError, OverflowError):
            return None
        # An empty slice is a trailing comma; strings and nulls are refused later anyway,
        # and numpy cannot join text to numbers.
        if not values.size or values.dtype.kind not in "biuf":
            return None
        slices.append(values)
        if cut < 0:
            return np.concatenate(slices)
        pos = cut + 1
        yield_gil()


def _put_back(head: dict[str, Any], arrays: dict[str, DecodedArray]) -> bool:
    """Replace each placeholder that is an input's `data` by its array; False when any
    placeholder was elsewhere (or lost to a repeated key): then nothing may be trusted."""
    inputs = head.get("inputs")
    for item in inputs if isinstance(inputs, list) else ():
        data = item.get("data") if isinstance(item, dict) else None
        if isinstance(data, str) and data in arrays:
            item["data"] = arrays.pop(data)
    return not arrays
