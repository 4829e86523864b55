"""Open Inference Protocol tensors <-> torch tensors: pure functions, no transport.

Tensors come out as `torch.Tensor`, never numpy arrays, because numpy has no
bfloat16 and the engine feeds torch anyway; numpy only carries typed contents
and output bytes. Raw bytes are little-endian and row-major (the OIP rule),
which is the host order on every platform torch ships for.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.errors import (
    ByteCountError,
    DtypeError,
    InvalidTensorError,
    ShapeMismatchError,
)

InferInputTensor = pb.ModelInferRequest.InferInputTensor
InferOutputTensor = pb.ModelInferResponse.InferOutputTensor

# Raw request bytes are immutable, so torch warns that a tensor viewing them is
# writable. Inputs are views by design (no copy); the engine only reads them.
warnings.filterwarnings(
    "ignore", message="The given buffer is not writable", category=UserWarning, module=__name__
)

# Below this size a copy costs nothing, and CPython shares 0- and 1-byte bytes
# objects interpreter-wide, which a view must never alias.
_ZERO_COPY_MIN_BYTES = 64
# torch sizes and strides are int64; a shape past this overflows them (INTERNAL, not a sentence).
MAX_ELEMENTS = 2**63 - 1
# Far past any model input's rank; it also keeps the shape an error message echoes short.
MAX_RANK = 64


@dataclass(frozen=True)
class Datatype:
    """One OIP datatype: its torch and numpy dtypes and its typed-contents field."""

    name: str
    torch: torch.dtype | None
    numpy: np.dtype | None  # None for BF16: numpy has no bfloat16
    field: str | None  # InferTensorContents field; None means raw bytes only
    wire: np.dtype | None  # the field's element type (int_contents holds INT8 as int32)
    itemsize: int  # bytes per element in raw form; 0 for BYTES (variable length)


def _dt(
    name: str, t: torch.dtype | None, n: str | None, field: str | None, wire: str | None
) -> Datatype:
    """Build one table row."""
    numpy = np.dtype(n) if n else None
    size = t.itemsize if t is not None else 0
    return Datatype(name, t, numpy, field, np.dtype(wire) if wire else None, size)


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", torch.bool, "bool", "bool_contents", "bool"),
        _dt("UINT8", torch.uint8, "uint8", "uint_contents", "uint32"),
        _dt("UINT16", torch.uint16, "uint16", "uint_contents", "uint32"),
        _dt("UINT32", torch.uint32, "uint32", "uint_contents", "uint32"),
        _dt("UINT64", torch.uint64, "uint64", "uint64_contents", "uint64"),
        _dt("INT8", torch.int8, "int8", "int_contents", "int32"),
        _dt("INT16", torch.int16, "int16", "int_contents", "int32"),
        _dt("INT32", torch.int32, "int32", "int_contents", "int32"),
        _dt("INT64", torch.int64, "int64", "int64_contents", "int64"),
        _dt("FP16", torch.float16, "float16", None, None),
        _dt("FP32", torch.float32, "float32", "fp32_contents", "float32"),
        _dt("FP64", torch.float64, "float64", "fp64_contents", "float64"),
        _dt("BF16", torch.bfloat16, None, None, None),
        _dt("BYTES", None, "object", "bytes_contents", None),
    )
}
"""OIP datatype name -> its row; the single source for every conversion below."""

_BY_TORCH: dict[torch.dtype, Datatype] = {d.torch: d for d in DATATYPES.values() if d.torch}
# Dtypes whose raw bytes numpy writes directly (bfloat16 needs a detour, see tensor_to_pb).
_RAW_FAST = {d.torch: d.name for d in DATATYPES.values() if d.torch and d.numpy is not None}
_CONTENT_FIELDS = tuple(sorted({d.field for d in DATATYPES.values() if d.field}))


def datatype_of(dtype: torch.dtype) -> str:
    """OIP datatype name of a torch dtype ("FP32" for torch.float32)."""
    try:
        return _BY_TORCH[dtype].name
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no Open Inference Protocol datatype") from None


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of an OIP name ("FP32") or a torch name ("float32", "torch.float32")."""
    row = DATATYPES.get(name.upper())
    if row is not None and row.torch is not None:
        return row.torch
    found = getattr(torch, name.removeprefix("torch."), None)
    if isinstance(found, torch.dtype) and found in _BY_TORCH:
        return found
    raise ValueError(f"unknown tensor datatype {name!r}; use an OIP name such as 'FP32'")


def _row_for_input(tensor: str, datatype: str) -> tuple[Datatype, torch.dtype]:
    """The table row and torch dtype of a request tensor, refusing what a model cannot take."""
    row = DATATYPES.get(datatype)
    if row is None:
        known = ", ".join(DATATYPES)
        raise InvalidTensorError(tensor, f"unknown datatype {datatype!r}; expected one of {known}")
    if row.torch is None:
        raise InvalidTensorError(tensor, f"datatype {datatype} is not supported by this model")
    return row, row.torch


def _render(shape: Sequence[int]) -> str:
    """[2, 3] for error sentences."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_shape(name: str, shape: tuple[int, ...]) -> int:
    """Refuse shapes no tensor can have, in exact integer arithmetic before anything is
    allocated: torch computes strides from the non-zero sizes even when one size is 0.
    Returns the element count."""
    if len(shape) > MAX_RANK:
        raise InvalidTensorError(name, f"has {len(shape)} dimensions, more than {MAX_RANK}")
    if shape and min(shape) < 0:
        raise InvalidTensorError(name, f"shape {_render(shape)} has a negative dimension")
    count = math.prod(shape)
    # With no zero size the count is that product; with one, the non-zero sizes' product.
    if count > MAX_ELEMENTS or (count == 0 and math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS):
        raise InvalidTensorError(name, f"shape {_render(shape)} is too large for any tensor")
    return count


def tensor_from_pb(tensor: InferInputTensor, raw: bytes | None) -> torch.Tensor:
    """Decode one request tensor from its raw bytes (when given) or its typed contents.

    Raw bytes become a zero-copy view (treat it as read-only); typed contents are
    copied once. Every malformation raises an `InvalidTensorError` naming the tensor.
    """
    name = tensor.name
    row, dtype = _row_for_input(name, tensor.datatype)
    shape = tuple(tensor.shape)
    count = _check_shape(name, shape)
    if raw is None:
        return _from_contents(name, row, shape, count, tensor.contents)
    if tensor.HasField("contents") and tensor.contents.ByteSize():
        raise InvalidTensorError(name, "has both typed contents and raw_input_contents; send one")
    return _from_raw(name, row.name, dtype, shape, count, raw)


def _from_raw(
    name: str, datatype: str, dtype: torch.dtype, shape: tuple[int, ...], count: int, raw: bytes
) -> torch.Tensor:
    """View raw little-endian bytes as a tensor of `shape`, checking the byte count."""
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise ByteCountError(name, expected, len(raw), datatype, shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = raw if len(raw) >= _ZERO_COPY_MIN_BYTES else bytearray(raw)
    flat = torch.frombuffer(buffer, dtype=dtype)
    # view(*shape) parses faster than view(shape); a 0-d shape needs the tuple form.
    result = flat.view(*shape) if shape else flat.view(shape)
    # A bool byte other than 0 or 1 is undefined behaviour in torch kernels.
    if dtype is torch.bool and int(result.view(torch.uint8).max()) > 1:
        raise InvalidTensorError(name, "BOOL raw bytes must each be 0 or 1")
    return result


def _from_contents(
    name: str, row: Datatype, shape: tuple[int, ...], count: int, contents: pb.InferTensorContents
) -> torch.Tensor:
    """Copy typed contents into a tensor of `shape`, checking field, count and range."""
    # FP16 and BF16 travel raw only (BF16 has no numpy dtype either).
    if row.field is None or row.numpy is None or row.wire is None:
        raise InvalidTensorError(
            name, f"datatype {row.name} has no typed contents field; send it in raw_input_contents"
        )
    values = getattr(contents, row.field)
    if len(values) != count:
        used = [f for f in _CONTENT_FIELDS if f != row.field and len(getattr(contents, f))]
        if used:
            raise InvalidTensorError(
                name, f"datatype {row.name} takes its values in {row.field}, got {used[0]}"
            )
        raise InvalidTensorError(
            name,
            f"expected {count} {row.name} values for shape {_render(shape)}, got {len(values)}",
        )
    wide = np.asarray(values, dtype=row.wire)
    if row.numpy.itemsize < row.wire.itemsize and wide.size:
        info = np.iinfo(row.numpy)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidTensorError(
                name, f"a value is out of range for {row.name} ({info.min} to {info.max})"
            )
    return torch.from_numpy(wide.astype(row.numpy, copy=False)).reshape(shape)


def inputs_from_pb(request: pb.ModelInferRequest) -> dict[str, torch.Tensor]:
    """Decode every input of a request, pairing `raw_input_contents` with inputs by position."""
    raw = request.raw_input_contents
    inputs = request.inputs
    if len(raw) == 1 and len(inputs) == 1:  # the common request: one raw tensor
        tensor = inputs[0]
        return {tensor.name: tensor_from_pb(tensor, raw[0])}
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, or none",
        )
    tensors: dict[str, torch.Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise InvalidTensorError(tensor.name, "appears more than once in the request")
        tensors[tensor.name] = tensor_from_pb(tensor, raw[index] if raw else None)
    return tensors


def tensor_to_pb(
    name: str, tensor: torch.Tensor, raw: bool
) -> tuple[InferOutputTensor, bytes | None]:
    """Encode one output tensor: raw bytes (returned beside it) or typed contents.

    FP16 and BF16 have no typed field: ask for them with `raw=True` (see
    `has_typed_contents`); anything else would be a caller bug, so it is a ValueError.
    """
    row = _BY_TORCH.get(tensor.dtype)
    if row is None:
        raise ValueError(f"output {name!r}: torch dtype {tensor.dtype} has no OIP datatype")
    host = tensor.detach().cpu()
    out = InferOutputTensor(name=name, datatype=row.name, shape=host.shape)
    if raw:
        # bfloat16 has no numpy dtype: its bytes are carried as int16 of the same width.
        if host.dtype is torch.bfloat16:
            host = host.view(torch.int16)
        # tobytes() writes C order in one copy even when the view is not contiguous.
        return out, host.numpy().tobytes()
    if row.field is None:
        raise ValueError(f"output {name!r}: datatype {row.name} can only be sent raw")
    getattr(out.contents, row.field).extend(host.numpy().ravel().tolist())
    return out, None


def has_typed_contents(dtype: torch.dtype) -> bool:
    """Whether a dtype can travel as typed contents (FP16 and BF16 cannot)."""
    row = _BY_TORCH.get(dtype)
    return row is not None and row.field is not None


def outputs_to_pb(
    response: pb.ModelInferResponse, outputs: Mapping[str, torch.Tensor], raw: bool
) -> None:
    """Append `outputs` to a response, all raw or all typed, as the OIP requires."""
    for name, tensor in outputs.items():
        if raw and tensor.is_cpu and tensor.dtype in _RAW_FAST:
            # The engine's outputs: host tensors of a numpy dtype. add() builds the entry in
            # place (append would copy a message built aside).
            response.outputs.add(name=name, datatype=_RAW_FAST[tensor.dtype], shape=tensor.shape)
            host = tensor.detach() if tensor.requires_grad else tensor
            response.raw_output_contents.append(host.numpy().tobytes())
            continue
        out, data = tensor_to_pb(name, tensor, raw)
        response.outputs.append(out)
        if data is not None:
            response.raw_output_contents.append(data)


def check_input(
    name: str, tensor: torch.Tensor, spec_dtype: torch.dtype | str, spec_shape: Sequence[int]
) -> None:
    """Check a tensor against a model's input spec; -1 in the spec matches any size."""
    expected = torch_dtype(spec_dtype) if isinstance(spec_dtype, str) else spec_dtype
    if tensor.dtype != expected:
        received = _BY_TORCH[tensor.dtype].name if tensor.dtype in _BY_TORCH else str(tensor.dtype)
        raise DtypeError(name, datatype_of(expected), received)
    shape = tuple(tensor.shape)
    if len(shape) != len(spec_shape) or any(
        want != -1 and want != got for want, got in zip(spec_shape, shape, strict=True)
    ):
        raise ShapeMismatchError(name, spec_shape, shape)
