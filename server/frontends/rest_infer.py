"""The V2 REST inference body <-> tensors: JSON `data`, and Triton's binary tensor extension.

A request body is a JSON header, optionally followed by the inputs' raw bytes in input
order (its length in the `Inference-Header-Content-Length` header, each input's in its
`binary_data_size` parameter). A response is built the same way when any output is
binary. Raw bytes are decoded by `convert.py`'s own helpers, so both protocols refuse a
malformed tensor with the same sentence.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch

from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.numbers import INT64_MAX, UINT64_MAX, is_json_int, json_int, parse_int
from moduleserve.server.convert import (
    Datatype,
    _check_shape,
    _from_raw,
    _row_for_input,
    datatype_of,
    has_typed_contents,
)
from moduleserve.server.dataplane import InferResult
from moduleserve.server.errors import InvalidTensorError
from moduleserve.server.frontends.rest_http import ENCODER
from moduleserve.server.frontends.rest_sliced import DecodedArray, loads_sliced, yield_gil

# What numpy infers from JSON values, per kind of datatype: ints also fit a float input.
_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "true or false", "iu": "integers", "iuf": "numbers"}

ENCODE_SLICE = 8 * 1024
"""Values written per JSON encoder call (~1 ms): the GIL is held for one call at a time."""

# Where a JSON output's values go in the encoded header: msgspec writes a NUL inside a
# string as \u0000, so a raw NUL byte can only be this marker.
_SPLICE = b"\x00"


@dataclass
class InferRequest:
    """One decoded request: tensors for the data plane, and how to answer it."""

    inputs: dict[str, torch.Tensor]
    id: str | None = None
    requested: list[str] = field(default_factory=list)
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # per requested output
    binary_default: bool = False  # the request's binary_data_output parameter
    deadline: float | None = None
    priority: int = 0


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode a request body; every malformation is an InvalidInputError sentence."""
    view = memoryview(body)
    split = len(view) if header_length is None else _header_length(header_length, len(view))
    head = loads_sliced(body if split == len(view) else bytes(view[:split]))
    binary = view[split:]
    inputs = _list(head, "inputs", required=True)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for item in inputs:
        name, tensor, used = _input(item, binary[offset:])
        if name in tensors:
            raise InvalidTensorError(name, "appears more than once in the request")
        tensors[name] = tensor
        offset += used
    if offset != len(binary):
        raise InvalidInputError(
            f"the body holds {len(binary)} bytes of binary data after its JSON header, but the "
            f"inputs' binary_data_size parameters add up to {offset}"
        )
    request = InferRequest(tensors, id=_id(head))
    for item in _list(head, "outputs"):
        out = _object(item, "each entry of 'outputs'")
        name = out.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInputError("each entry of 'outputs' needs a 'name' string")
        request.requested.append(name)
        params = _object(out.get("parameters", {}), f"output {name!r} 'parameters'")
        if "binary_data" in params:
            request.binary_outputs[name] = _bool(params, "binary_data", f"output {name!r}")
    params = _object(head.get("parameters", {}), "the request's 'parameters'")
    request.binary_default = _bool(params, "binary_data_output", "the request")
    # Both unsigned 64-bit in the Open Inference Protocol; gRPC clients cannot send more.
    request.priority = _int(params, "priority", high=UINT64_MAX)
    timeout_us = _int(params, "timeout", high=UINT64_MAX)  # microseconds
    if timeout_us > 0:
        request.deadline = time.monotonic() + timeout_us / 1e6
    return request


def _header_length(value: str, body_length: int) -> int:
    # Only HTTP's own whitespace around the value: str.strip() would also take '\x85'.
    length = parse_int(value.strip(" \t"), "the Inference-Header-Content-Length header")
    if length == 0:
        raise InvalidInputError(
            "a raw binary request (Inference-Header-Content-Length: 0) is not supported; "
            "send a JSON header describing the inputs before their bytes"
        )
    if length > body_length:
        raise InvalidInputError(
            f"the Inference-Header-Content-Length header says {length} bytes, but the body "
            f"has only {body_length}"
        )
    return length


def _input(item: Any, binary: memoryview) -> tuple[str, torch.Tensor, int]:
    """One input: its name, its tensor, and how many binary bytes it used."""
    item = _object(item, "each entry of 'inputs'")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError("each entry of 'inputs' needs a 'name' string")
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidTensorError(name, "needs a 'datatype' string such as \"FP32\"")
    row, dtype = _row_for_input(name, datatype)
    raw_shape = item.get("shape")
    if not isinstance(raw_shape, list) or not all(is_json_int(d) for d in raw_shape):
        raise InvalidTensorError(name, "needs a 'shape' array of integers")
    shape = tuple(raw_shape)
    _check_shape(name, shape)
    count = math.prod(shape)
    params = _object(item.get("parameters", {}), f"input {name!r} 'parameters'")
    if "binary_data_size" not in params:
        if "data" not in item:
            raise InvalidTensorError(name, "has no 'data' and no 'binary_data_size' parameter")
        return name, _from_json(name, row, shape, count, item["data"]), 0
    size = _int(params, "binary_data_size", f"input {name!r}")
    if "data" in item:
        raise InvalidTensorError(name, "has both 'data' and binary_data_size; send one")
    if size > len(binary):
        raise InvalidTensorError(
            name,
            f"binary_data_size is {size}, but only {len(binary)} bytes of binary data are left",
        )
    return name, _from_raw(name, row.name, dtype, shape, count, binary[:size]), size


def _from_json(
    name: str, row: Datatype, shape: tuple[int, ...], count: int, data: Any
) -> torch.Tensor:
    """A tensor from a JSON array, flat or nested, checking count, value kinds and range."""
    if row.numpy is None or not has_typed_contents(row.torch):  # type: ignore[arg-type]
        raise InvalidTensorError(
            name,
            f"datatype {row.name} cannot be sent as JSON numbers; send it as binary data "
            "(the binary_data_size parameter)",
        )
    values = _asarray(name, data)
    if values.size != count:
        raise InvalidTensorError(
            name, f"expected {count} {row.name} values for shape {list(shape)}, got {values.size}"
        )
    if count and row.numpy.kind in "iu" and values.dtype.kind in "fO":
        values = _exact_integers(
            name, row, data.to_list() if isinstance(data, DecodedArray) else data
        )
    if count:
        kinds = _KINDS[row.numpy.kind]
        if values.dtype.kind not in kinds:
            raise InvalidTensorError(name, f"{row.name} data must be {_KIND_WORDS[kinds]}")
        if row.numpy.kind in "iu":
            info = np.iinfo(row.numpy)
            if values.min() < info.min or values.max() > info.max:
                raise InvalidTensorError(
                    name, f"a value is out of range for {row.name} ({info.min} to {info.max})"
                )
    return torch.from_numpy(values.astype(row.numpy).reshape(shape))


def _asarray(name: str, data: Any) -> np.ndarray:
    """np.asarray(data) of a JSON array, or the array rest_sliced decoded already."""
    if isinstance(data, DecodedArray):
        return data.values
    if not isinstance(data, list):
        raise InvalidTensorError(name, "'data' must be a JSON array")
    try:
        return np.asarray(data)
    except (ValueError, OverflowError):
        raise InvalidTensorError(
            name, "'data' is ragged: nested arrays must each hold the same number of values"
        ) from None


def _exact_integers(name: str, row: Datatype, data: list[Any]) -> np.ndarray:
    """Integers numpy would have rounded to float64 (past 2**63, or beside a float): checked
    one by one, so a large UINT64 arrives exact and a fraction is refused, never truncated."""
    flat = np.asarray(data, dtype=object).ravel().tolist()
    if not all(type(v) is int for v in flat):
        raise InvalidTensorError(name, f"{row.name} data must be integers")
    info = np.iinfo(row.numpy)
    if min(flat) < info.min or max(flat) > info.max:
        raise InvalidTensorError(
            name, f"a value is out of range for {row.name} ({info.min} to {info.max})"
        )
    return np.array(flat, dtype=row.numpy)


def encode_response(
    model: str, request: InferRequest, result: InferResult
) -> tuple[list[bytes], int]:
    """The response body parts and the length of its JSON header.

    The header comes in pieces with each JSON output's values between them, never copied
    into one buffer (a copy of a 60 MB array holds the GIL for tens of milliseconds);
    binary outputs follow it."""
    outputs: list[dict[str, Any]] = []
    arrays: list[bytes] = []
    binaries: list[bytes] = []
    for name, tensor in result.outputs.items():
        host = tensor.detach().cpu()
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(host.dtype),
            "shape": list(host.shape),
        }
        # FP16 and BF16 have no JSON form (as in Triton): binary whatever was asked.
        wanted = request.binary_outputs.get(name, request.binary_default)
        if wanted or not has_typed_contents(host.dtype):
            data = _raw_bytes(host)
            entry["parameters"] = {"binary_data_size": len(data)}
            binaries.append(data)
        else:
            entry["data"] = msgspec.Raw(_SPLICE)
            arrays.append(_json_array(host.numpy().ravel()))
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": str(result.version)}
    if request.id is not None:
        head["id"] = request.id
    head["outputs"] = outputs
    pieces = ENCODER.encode(head).split(_SPLICE)  # not dumps(): the stdlib has no Raw
    header = [pieces[0]]
    for array, piece in zip(arrays, pieces[1:], strict=True):
        header += [array, piece]
    return [*header, *binaries], sum(len(part) for part in header)


def _json_array(flat: np.ndarray) -> bytes:
    """A JSON array of `flat`'s values, ENCODE_SLICE values per encoder call, joined by
    one bytes.join (which copies without the GIL).

    NaN and infinities are written as the stdlib always wrote them (NaN, Infinity,
    -Infinity, which Python's json and tritonclient's rapidjson read), where msgspec
    would write null: slices holding any go through the stdlib."""
    parts = [b"["]
    for start in range(0, flat.size, ENCODE_SLICE):
        if start:
            yield_gil()
            parts.append(b",")
        piece = flat[start : start + ENCODE_SLICE]
        values = piece.tolist()
        if piece.dtype.kind == "f" and not np.isfinite(piece).all():
            encoded = json.dumps(values, separators=(",", ":")).encode()
        else:
            encoded = ENCODER.encode(values)
        parts.append(encoded[1:-1])  # bytes, not memoryview: join drops the GIL for bytes only
    parts.append(b"]")
    return b"".join(parts)


def _raw_bytes(host: torch.Tensor) -> bytes:
    """Little-endian row-major bytes; bfloat16 travels as int16 of the same bits (no numpy)."""
    if host.dtype is torch.bfloat16:
        host = host.view(torch.int16)
    return host.numpy().tobytes()


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return value


def _list(head: dict[str, Any], key: str, required: bool = False) -> list[Any]:
    value = head.get(key)
    if value is None:
        if required:
            raise InvalidInputError(f"the request needs an {key!r} array")
        return []
    if not isinstance(value, list):
        raise InvalidInputError(f"the request's {key!r} must be a JSON array")
    return value


def _id(head: dict[str, Any]) -> str | None:
    value = head.get("id")
    if value is not None and not isinstance(value, str):
        raise InvalidInputError("the request's 'id' must be a string")
    if value is not None and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate escape: no UTF-8 answer can hold it
            raise InvalidInputError(
                "the request's 'id' must be text without lone surrogates"
            ) from None
    return value


def _int(
    params: dict[str, Any], key: str, owner: str = "the request", high: int = INT64_MAX
) -> int:
    """An integer parameter, 0 when absent: a JSON integer from 0 to `high`."""
    return json_int(params.get(key, 0), f"{owner}: parameter {key!r}", 0, high)


def _bool(params: dict[str, Any], key: str, owner: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{owner}: parameter {key!r} must be true or false")
    return value
