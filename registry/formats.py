"""Reading and writing tensor files safely: safetensors, `.pt/.pth` without pickle code, `.npz`.

Tied weights (two state_dict keys sharing storage) are stored once and recorded in
the safetensors metadata, so they come back as one tensor under both names.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save

from moduleserve.registry.errors import CheckpointFormatError, UnsafeCheckpointError, shorten
from moduleserve.registry.torchfiles import (
    SizeLimit,
    check_no_repeated_bytes,
    read_torch_file,
    reason,
    storage_identity,
    zip_entries,
)

TIES_KEY = "moduleserve.ties"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DATASET_SUFFIXES = (".safetensors", ".npz", *PICKLE_SUFFIXES)
# What safetensors can hold; anything else could not be stored.
STORABLE_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.complex64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.bool,
    }
)


def read_tensor_file(
    path: Path, *, limit: SizeLimit, key: str | None = None
) -> dict[str, torch.Tensor]:
    """Read named tensors from a .safetensors, .pt/.pth or .npz file, never running code.

    Compressed zip entries are inflated only when their declared sizes fit `limit`; `key`
    takes the state_dict out of a dict checkpoint (.pt/.pth only). Every refusal is one
    sentence naming the file.
    """
    path = Path(path)
    label = shorten(path.name)
    if not path.is_file():
        raise CheckpointFormatError(f"file {shorten(str(path))!r} does not exist")
    suffix = path.suffix.lower()
    if key is not None and suffix not in PICKLE_SUFFIXES:
        raise CheckpointFormatError(
            f"{label}: --key picks a state_dict out of a .pt/.pth checkpoint, not a "
            f"{shorten(suffix)} file"
        )
    if suffix == ".safetensors":
        tensors = _read_safetensors(path, label)
    elif suffix in PICKLE_SUFFIXES:
        tensors = read_torch_file(path, label, limit, key)
    elif suffix == ".npz":
        tensors = _read_npz(path, label, limit)
    else:
        raise CheckpointFormatError(
            f"{label}: unknown file type {shorten(suffix) or '(none)'}; "
            "use .safetensors, .pt/.pth (a saved state_dict) or .npz"
        )
    check_tensors(tensors, label)
    if suffix in PICKLE_SUFFIXES:
        check_no_repeated_bytes(tensors, label)  # only torch.save files keep views
    return tensors


def check_tensors(tensors: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse tensors that cannot be stored as they are (sparse, meta, repeated bytes, …)."""
    for name, tensor in tensors.items():
        problem = _tensor_problem(tensor)
        if problem:
            raise CheckpointFormatError(f"{label}: tensor {shorten(name)!r} {problem}")


def _tensor_problem(tensor: torch.Tensor) -> str:
    if tensor.layout != torch.strided or tensor.is_nested:
        kind = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        return f"is {kind}, not dense; save tensor.to_dense() or a plain tensor instead"
    if tensor.is_quantized:
        return "is quantized; save tensor.dequantize() instead"
    if tensor.is_meta:
        return "is a meta tensor and holds no data"
    if tensor.dtype not in STORABLE_DTYPES:
        return f"has dtype {dtype_name(tensor.dtype)}, which cannot be stored"
    if math.prod(d for d in tensor.shape if d) >= 2**63:
        return f"has shape {shorten(list(tensor.shape))}, whose size overflows int64"
    need = tensor.numel() * tensor.element_size()
    have = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    if need > have:
        # e.g. torch.zeros(1).expand(8192, 8192): 4 bytes in the file, 256 MiB once stored.
        return (
            f"has shape {shorten(list(tensor.shape))} but only {max(have, 0)} bytes of data "
            "(a zero-stride or overlapping view, e.g. from expand()); save tensor.contiguous()"
        )
    return ""


def _read_safetensors(path: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        return decode_tensors(path.read_bytes())
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{label} is {exc}") from exc


def _read_npz(path: Path, label: str, limit: SizeLimit) -> dict[str, torch.Tensor]:
    if zip_entries(path, label, limit) is None:
        raise CheckpointFormatError(f"{label} is not a .npz (zip) file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: np.array(archive[name]) for name in archive.files}
    except ValueError as exc:
        raise UnsafeCheckpointError(f"{label} was refused: {reason(exc)}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointFormatError(f"{label} is not a readable .npz file ({reason(exc)})") from exc
    return {name: _array_to_tensor(name, array, label) for name, array in arrays.items()}


def _array_to_tensor(name: str, array: np.ndarray[Any, Any], label: str) -> torch.Tensor:
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise CheckpointFormatError(
            f"{label}: array {shorten(name)!r} has dtype {array.dtype}, which is not a tensor dtype"
        ) from exc


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise named tensors to safetensors bytes, storing tied tensors once."""
    unique: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    seen: dict[tuple[object, ...], str] = {}
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        identity = storage_identity(tensor)
        if identity in seen:
            ties[name] = seen[identity]
            continue
        seen[identity] = name
        unique[name] = tensor.contiguous()
    metadata = {TIES_KEY: json.dumps(ties, sort_keys=True)} if ties else None
    return safetensors_save(unique, metadata=metadata)


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `encode_tensors`: tied names come back as the same tensor."""
    try:
        tensors = safetensors_load(data)
        metadata = read_metadata(data)
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise CheckpointFormatError(f"not a valid safetensors file ({exc})") from exc
    return _restore_ties(tensors, metadata)


def decode_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """`decode_tensors` straight from a file (memory-mapped: the bytes are not held twice)."""
    try:
        tensors = safetensors_load_file(str(path))
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            metadata = read_metadata(struct.pack("<Q", size) + handle.read(size))
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise CheckpointFormatError(f"not a valid safetensors file ({exc})") from exc
    return _restore_ties(tensors, metadata)


def _restore_ties(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Give every tied name the very tensor it was stored under (see `encode_tensors`)."""
    for name, target in json.loads(metadata.get(TIES_KEY, "{}")).items():
        tensors[name] = tensors[target]
    return tensors


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors header."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})


def describe_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, object]]:
    """Name → {dtype, shape}: what the registry records about a dataset."""
    return {
        name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        for name, t in sorted(tensors.items())
    }


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` → "float32"."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """ "float32" → `torch.float32`; raises ValueError for unknown names."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
