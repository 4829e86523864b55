"""Reading and writing tensor files safely: safetensors, `.pt/.pth` without pickle code, `.npz`.

Tied weights (two state_dict keys sharing storage) are stored once and recorded in
the safetensors metadata, so they come back as one tensor under both names.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save

from registry.errors import CheckpointFormatError, UnsafeCheckpointError

TIES_KEY = "moduleserve.ties"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DATASET_SUFFIXES = (".safetensors", ".npz", *PICKLE_SUFFIXES)


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """Read named tensors from a .safetensors, .pt/.pth or .npz file, never running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return decode_tensors(path.read_bytes())
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    if suffix == ".npz":
        return _read_npz(path)
    raise CheckpointFormatError(
        f"{path.name}: unknown file type {suffix or '(none)'}; "
        "use .safetensors, .pt/.pth (a saved state_dict) or .npz"
    )


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: only tensors and plain containers; anything else is refused.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path.name} was refused: its pickle asks for more than tensors and plain "
            f"containers, and nothing in it was run ({_refusal_reason(exc)})"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointFormatError(f"{path.name} is not a readable torch file ({exc})") from exc
    return _as_flat_tensors(loaded, path.name)


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: torch.from_numpy(np.array(archive[name])) for name in archive.files}
    except ValueError as exc:
        raise UnsafeCheckpointError(f"{path.name} was refused: {exc}") from exc
    except OSError as exc:
        raise CheckpointFormatError(f"{path.name} is not a readable .npz file ({exc})") from exc


def _as_flat_tensors(loaded: object, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, Mapping):
        raise CheckpointFormatError(
            f"{label} holds a {type(loaded).__name__}, not a state_dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    result: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            hint = (
                " (a training checkpoint? save model.state_dict() instead)"
                if isinstance(value, Mapping)
                else ""
            )
            raise CheckpointFormatError(
                f"{label}: entry {key!r} is a {type(value).__name__}, not a tensor{hint}"
            )
        result[key] = value
    return result


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise named tensors to safetensors bytes, storing tied tensors once."""
    unique: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    seen: dict[tuple[object, ...], str] = {}
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        identity = _storage_identity(tensor)
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


def _storage_identity(tensor: torch.Tensor) -> tuple[object, ...]:
    if tensor.numel() == 0:
        return (id(tensor),)
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def _refusal_reason(exc: BaseException) -> str:
    """The line of torch's message that names what was blocked (it also suggests unsafe fixes)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.rstrip(".")
    return "it is not a plain state_dict"
