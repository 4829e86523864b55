"""Reading `torch.save` files safely: no pickle code runs, and nothing is inflated or read
before its declared size is checked.

A `.pt/.pth` file is a zip whose `data.pkl` describes the tensors and whose other entries
hold their bytes. The zip directory declares every entry's inflated size, so a compressed
entry (torch.save never writes one) is refused before inflation when it would exceed the
caller's limit, and stored entries are memory-mapped: a tensor's bytes are read only when
it is used, after its shape and dtype were checked against the class.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import shlex
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from moduleserve.registry.errors import (
    CheckpointFormatError,
    InvalidInputError,
    UnsafeCheckpointError,
    listing,
    shorten,
)

ZIP_MAGIC = b"PK\x03\x04"
# Where training scripts keep the model's state_dict inside a checkpoint dict (the --key hint).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Lines torch.load adds to a refusal that advise rather than say what was wrong.
TORCH_ADVICE = ("Weights only load failed", "Check the documentation", "(1)", "(2)")


@dataclass(frozen=True)
class SizeLimit:
    """How far a file's compressed entries may inflate, and why that much (for the refusal)."""

    max_bytes: int
    why: str


def read_torch_file(
    path: Path, label: str, limit: SizeLimit, key: str | None
) -> dict[str, torch.Tensor]:
    """The state_dict in a torch.save file (under `key` of a dict checkpoint), read safely."""
    entries = zip_entries(path, label, limit)
    if entries is not None:
        _check_torch_zip(entries, label)
    # mmap leaves stored entries in the file until a tensor is touched, so nothing is read
    # before the shapes are checked; compressed entries cannot be mapped (and fit `limit`).
    stored = entries is not None and all(e.compress_type == zipfile.ZIP_STORED for e in entries)
    loaded = _torch_load(path, label, mmap=stored)
    return pick_state_dict(loaded, label, key)


def zip_entries(path: Path, label: str, limit: SizeLimit) -> list[zipfile.ZipInfo] | None:
    """A zip file's entries, once it is whole and inflates within `limit`; None if not a zip."""
    with open(path, "rb") as handle:
        magic = handle.read(len(ZIP_MAGIC))
    if not magic:
        raise CheckpointFormatError(f"{label} is empty")
    if magic != ZIP_MAGIC:
        return None  # torch's legacy (pre-1.6) format: uncompressed, torch reads it as is
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise CheckpointFormatError(
            f"{label} is truncated or damaged: its zip directory cannot be read"
        ) from exc
    size = path.stat().st_size
    if any(e.header_offset + e.compress_size > size for e in entries):
        raise CheckpointFormatError(f"{label} is truncated: its entries run past the end")
    inflated = sum(e.file_size for e in entries if e.compress_type != zipfile.ZIP_STORED)
    if inflated > limit.max_bytes:
        raise CheckpointFormatError(
            f"{label} was refused unread: its compressed entries would inflate to "
            f"{size_text(inflated)}, more than the {size_text(limit.max_bytes)} {limit.why}"
        )
    return entries


def _check_torch_zip(entries: list[zipfile.ZipInfo], label: str) -> None:
    names = [e.filename for e in entries]
    if any(n.endswith("/constants.pkl") for n in names):
        raise CheckpointFormatError(
            f"{label} is a TorchScript archive (torch.jit.save); push the model's state_dict"
        )
    if not any(n.endswith("/data.pkl") for n in names):
        raise CheckpointFormatError(f"{label} is a zip file but not one torch.save wrote")


def _torch_load(path: Path, label: str, *, mmap: bool) -> object:
    try:
        # weights_only: only tensors and plain containers; anything else is refused unrun.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, label, exc) from exc
    except Exception as exc:  # a damaged pickle makes torch raise almost anything (KeyError, …)
        raise CheckpointFormatError(
            f"{label} is damaged or not a torch file ({reason(exc)})"
        ) from exc


def _refusal(path: Path, label: str, exc: pickle.UnpicklingError) -> InvalidInputError:
    """The sentence for a pickle torch's weights_only unpickler refused."""
    if _pickles_a_module(path):
        return UnsafeCheckpointError(
            f"{label} holds a whole pickled model (torch.save(model)), refused unrun; "
            "save model.state_dict() instead"
        )
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if found is None:
        return CheckpointFormatError(f"{label} is damaged: its pickle is malformed ({reason(exc)})")
    return UnsafeCheckpointError(
        f"{label} was refused: its pickle asks for more than tensors and plain containers, "
        f"and nothing in it was run (GLOBAL {shorten(found[1])})"
    )


def _pickles_a_module(path: Path) -> bool:
    """Whether the pickle holds an nn.Module, read as opcodes only (nothing is built)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            data = archive.read(name)  # its size was checked against the limit already
        strings = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError, EOFError):
        return False  # not a zip, or opcodes that do not parse: then it is no module
    if any(s.startswith(("torch.nn.modules.", "torch.nn.modules ")) for s in strings):
        return True
    return {"_modules", "_parameters"} <= strings  # nn.Module's own attribute names


def pick_state_dict(loaded: object, label: str, key: str | None) -> dict[str, torch.Tensor]:
    """The name → tensor mapping in what torch.load returned (under `key` when given)."""
    if key is not None:
        if not isinstance(loaded, Mapping):
            raise CheckpointFormatError(
                f"{label} holds a {type(loaded).__name__}, not a dict, so --key cannot pick from it"
            )
        if key not in loaded:
            raise CheckpointFormatError(
                f"{label} has no entry {shorten(key)!r} (its entries: {listing(list(loaded))})"
            )
        loaded, label = loaded[key], f"entry {shorten(key)!r} of {label}"
    if not isinstance(loaded, Mapping):
        raise CheckpointFormatError(
            f"{label} holds a {type(loaded).__name__}, not a state_dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    others = [k for k, v in loaded.items() if not _is_named_tensor(k, v)]
    if others:
        raise _not_a_state_dict(loaded, label, others, key)
    return dict(loaded)


def _not_a_state_dict(
    loaded: Mapping[object, object], label: str, others: list[object], key: str | None
) -> CheckpointFormatError:
    nested = [k for k, v in loaded.items() if isinstance(k, str) and _is_state_dict(v)]
    if nested and key is None:
        best = next((k for k in STATE_DICT_KEYS if k in nested), nested[0])
        return CheckpointFormatError(
            f"{label} is a training checkpoint ({listing(list(loaded))}), not a state_dict: "
            f"pass --key {shlex.quote(shorten(best))} to push the state_dict stored there"
        )
    described = [f"{shorten(k, 40)} ({type(loaded[k]).__name__})" for k in others]
    return CheckpointFormatError(
        f"{label}: {len(others)} entries are not named tensors ({listing(described)}); "
        "a state_dict maps names to tensors"
    )


def _is_named_tensor(key: object, value: object) -> bool:
    return isinstance(key, str) and isinstance(value, torch.Tensor)


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(_is_named_tensor(k, v) for k, v in value.items())
    )


def check_no_repeated_bytes(tensors: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse views that together hold more bytes than their storages (stored, they would).

    Each tensor was checked on its own already; this catches many views of one storage
    (a file of a few MiB that would store GiB), which torch.save writes but never for a
    state_dict.
    """
    views: dict[tuple[object, ...], int] = {}
    storages: dict[int, int] = {}
    for tensor in tensors.values():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        views[storage_identity(tensor)] = tensor.numel() * tensor.element_size()
    need, have = sum(views.values()), sum(storages.values())
    if need > have:
        raise CheckpointFormatError(
            f"{label} was refused: its tensors are overlapping views that would store "
            f"{size_text(need)} from {size_text(have)} of data; save each tensor .clone()d"
        )


def reason(exc: BaseException) -> str:
    """The informative line of an exception's text, shortened (torch adds pages of advice)."""
    text = str(exc).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    facts = [line for line in lines if not line.startswith(TORCH_ADVICE)]
    return shorten(facts[0] if facts else type(exc).__name__, 120)


def size_text(size: int) -> str:
    """A byte count for messages: "123 bytes", "4.0 MiB"."""
    return f"{size} bytes" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def storage_identity(tensor: torch.Tensor) -> tuple[object, ...]:
    """What makes two tensors the very same data (tied weights compare equal)."""
    if tensor.numel() == 0:
        return (id(tensor),)
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )
