"""Datasets uploaded in pieces: the safetensors header is written first, from the declared
names, dtypes and shapes, then the tensors' bytes as they arrive, hashed on the way, so an
upload never sits whole in memory and its blob is content-addressed like any other."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from moduleserve.registry.blobs import BlobStore, BlobWriter
from moduleserve.registry.datasets import Datasets
from moduleserve.registry.entities import Dataset
from moduleserve.registry.errors import AlreadyExistsError, DatasetNotFoundError, InvalidInputError
from moduleserve.registry.names import check_name

# torch dtype name → (safetensors code, bytes per element).
SAFETENSORS_DTYPES = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
TENSOR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class DeclaredTensor:
    """One tensor an upload announces before its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Exact byte count (Python integers: no overflow whatever the shape)."""
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype][1]


class DatasetUpload:
    """One dataset arriving in chunks: `write` each, then `finish` (or `abort`)."""

    def __init__(
        self,
        blobs: BlobStore,
        datasets: Datasets,
        name: str,
        tensors: Sequence[DeclaredTensor],
        description: str,
        max_bytes: int,
    ) -> None:
        check_name("dataset", name)
        _check_declared(tensors, max_bytes)
        try:
            datasets.get(name)
        except DatasetNotFoundError:
            pass
        else:
            raise AlreadyExistsError(f"dataset {name!r} already exists")
        self.name, self.description = name, description
        self._datasets = datasets
        self._tensors = list(tensors)
        self._expected = sum(t.nbytes for t in tensors)
        self._received = 0
        self._writer: BlobWriter = blobs.writer()
        self._writer.write(safetensors_header(tensors))

    def write(self, chunk: bytes) -> None:
        """Append the next piece of the tensors' bytes."""
        if self._received + len(chunk) > self._expected:
            raise InvalidInputError(
                f"dataset {self.name!r}: more bytes arrived than the declared tensors hold "
                f"({self._expected})"
            )
        self._writer.write(chunk)
        self._received += len(chunk)

    def finish(self) -> Dataset:
        """Store the blob and record the dataset; refused if bytes are missing."""
        if self._received != self._expected:
            raise InvalidInputError(
                f"dataset {self.name!r}: received {self._received} of the "
                f"{self._expected} bytes the declared tensors hold"
            )
        size = self._writer.size
        digest = self._writer.commit()
        described = {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in self._tensors}
        return self._datasets.add(self.name, digest, size, described, self.description)

    def abort(self) -> None:
        """Drop what was written (nothing is recorded)."""
        self._writer.abort()


def safetensors_header(tensors: Sequence[DeclaredTensor]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `tensors` in order."""
    entries: dict[str, object] = {}
    offset = 0
    for tensor in tensors:
        code = SAFETENSORS_DTYPES[tensor.dtype][0]
        entries[tensor.name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header


def _check_declared(tensors: Sequence[DeclaredTensor], max_bytes: int) -> None:
    if not tensors:
        raise InvalidInputError("a dataset upload declares no tensors")
    seen: set[str] = set()
    for tensor in tensors:
        if not TENSOR_NAME.match(tensor.name) or tensor.name == "__metadata__":
            raise InvalidInputError(
                f"invalid tensor name {tensor.name[:40]!r}: letters, digits, '_', '.', '-'"
            )
        if tensor.name in seen:
            raise InvalidInputError(f"tensor {tensor.name!r} is declared twice")
        seen.add(tensor.name)
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise InvalidInputError(
                f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype[:20]!r} "
                f"(use {', '.join(SAFETENSORS_DTYPES)})"
            )
        if not tensor.shape or any(d < 0 for d in tensor.shape):
            raise InvalidInputError(
                f"tensor {tensor.name!r}: shape {list(tensor.shape)[:8]} must have at least "
                "one dimension and none negative"
            )
    total = sum(t.nbytes for t in tensors)
    if total > max_bytes:
        raise InvalidInputError(
            f"the declared tensors hold {total} bytes, over the upload limit of {max_bytes}"
        )
