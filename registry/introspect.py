"""Introspection of ``nn.Module`` models: module tree, tensor statistics, values and diffs.

Plain functions shared by the introspection RPCs, the admin CLI and tests: torch, the
standard library, and the client's result dataclasses (``client.introspection_results``),
returned as they are (``registry.inspection`` applies them to stored versions). Statistics
are computed in float64 over fixed-size chunks, so a large tensor is never copied whole. NaN
and Inf are counted apart, and mean, std, min, max and the L2 norm cover the finite values
only, so one NaN does not hide everything else.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from types import EllipsisType

import torch
from torch import nn

from moduleserve.client.introspection_results import (
    DiffMetrics,
    KindFilter,
    ModuleNode,
    StateDiff,
    TensorDiff,
    TensorKind,
    TensorStats,
    TensorSummary,
    Totals,
)
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.numbers import InvalidNumberError, parse_int

# 4M float64 elements = 32 MiB of working memory per chunk, yet few enough kernel launches.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
# 256Ki elements are 2 MiB even as float64: under gRPC's default 4 MiB message limit.
DEFAULT_MAX_ELEMENTS = 1 << 18
_MAX_SLICE_CHARS = 1024
_MAX_PATTERN_CHARS = 1024


class IntrospectionError(Exception):
    """Base class of the errors the plain functions raise about what was asked of them; the
    ones about malformed input also belong to the registry's InvalidInputError family."""


class InvalidPatternError(IntrospectionError, InvalidInputError, ValueError):
    """A tensor-name pattern that cannot be used (empty, too long, or an unclosed '[')."""

    def __init__(self, pattern: str, reason: str = "is empty") -> None:
        shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
        super().__init__(f"name pattern {shown!r} {reason}; give a glob such as 'encoder.*'")
        self.pattern, self.reason = pattern, reason


class TensorNotFoundError(IntrospectionError, LookupError):
    """No parameter or buffer has the requested name."""

    def __init__(self, name: str, known: Iterable[str] = ()) -> None:
        names = list(known)
        self.name = name
        self.suggestions = tuple(difflib.get_close_matches(name, names, n=3))
        hint = " or ".join(repr(s) for s in self.suggestions)
        where = f"; did you mean {hint}?" if hint else f" among {len(names)} tensors"
        super().__init__(f"tensor {name!r} not found{where}")


class TensorNotMaterializedError(IntrospectionError, ValueError):
    """The tensor lives on the ``meta`` device (or another layout) and has no readable values."""

    def __init__(self, name: str) -> None:
        super().__init__(f"tensor {name!r} holds no readable values (meta, sparse or quantized)")
        self.name = name


class InvalidSliceError(IntrospectionError, InvalidInputError, ValueError):
    """A slice string that does not parse or does not fit the tensor's shape."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid slice {text!r}: {reason}")
        self.text, self.reason = text, reason


class TooLargeError(IntrospectionError, InvalidInputError, ValueError):
    """The selected values exceed the element cap."""

    def __init__(self, name: str, elements: int, cap: int) -> None:
        super().__init__(
            f"tensor {name!r} selection has {elements:,} elements, over the cap of {cap:,};"
            " select fewer with a slice such as '0:8'"
        )
        self.name, self.elements, self.cap = name, elements, cap


def module_tree(module: nn.Module) -> list[ModuleNode]:
    """Return every submodule in ``named_modules()`` order with its parameter counts."""
    nodes = []
    # remove_duplicate=False: a submodule registered twice shows at both places, as in print().
    for name, mod in module.named_modules(remove_duplicate=False):
        total, trainable, _, _ = _tally(mod.parameters())
        own = _tally(mod.parameters(recurse=False))[0]
        depth = name.count(".") + 1 if name else 0
        cls = type(mod).__name__
        nodes.append(
            ModuleNode(name, depth, cls, mod.extra_repr(), total, trainable, total - trainable, own)
        )
    return nodes


def totals(module: nn.Module) -> Totals:
    """Return parameter and buffer totals for the whole module."""
    params, trainable, param_bytes, param_tensors = _tally(module.parameters())
    buf_elements, _, buf_bytes, buf_tensors = _tally(module.buffers())
    frozen = params - trainable
    return Totals(
        params, trainable, frozen, param_bytes, param_tensors, buf_elements, buf_bytes, buf_tensors
    )


def tensor_summaries(
    module: nn.Module,
    kind: KindFilter = "all",
    pattern: str | None = None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> list[TensorSummary]:
    """Summarize parameters and/or buffers whose names match the fnmatch glob ``pattern``."""
    if kind not in ("parameters", "buffers", "all"):
        raise ValueError(f"kind must be 'parameters', 'buffers' or 'all', not {kind!r}")
    if pattern is not None:
        check_pattern(pattern)
    entries = list(_named_tensors(module))
    # Ties are found among all entries, so tied_to does not depend on kind or pattern.
    aliases: dict[Hashable, list[str]] = {}
    for name, _, tensor in entries:
        aliases.setdefault(_alias_key(tensor), []).append(name)
    stats: dict[Hashable, TensorStats | None] = {}
    summaries = []
    for name, entry_kind, tensor in entries:
        if kind not in ("all", entry_kind + "s"):
            continue
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
            continue
        key = _alias_key(tensor)
        if key not in stats:  # tied tensors are read once
            stats[key] = tensor_stats(tensor, chunk_elements)
        shape, dtype, device = tuple(tensor.shape), _dtype_name(tensor.dtype), str(tensor.device)
        grad = entry_kind == "parameter" and tensor.requires_grad
        tied = tuple(other for other in aliases[key] if other != name)
        summary = TensorSummary(
            name, entry_kind, shape, dtype, device, tensor.numel(), grad, tied, stats[key]
        )
        summaries.append(summary)
    return summaries


def check_pattern(pattern: str) -> None:
    """Raise InvalidPatternError for a glob that is blank, over-long or has an unclosed '['.

    fnmatch would read an unclosed '[' as a literal character and silently match nothing.
    """
    if not pattern.strip():
        raise InvalidPatternError(pattern)
    if len(pattern) > _MAX_PATTERN_CHARS:
        raise InvalidPatternError(pattern, f"is longer than {_MAX_PATTERN_CHARS} characters")
    start = pattern.find("[")
    while start != -1:
        # As fnmatch does: a ']' right after '[' or '[!' belongs to the set.
        first = start + 1 + (pattern[start + 1 : start + 2] == "!")
        end = pattern.find("]", first + 1)
        if end == -1:
            raise InvalidPatternError(pattern, f"has an unclosed '[' at position {start}")
        start = pattern.find("[", end + 1)


def tensor_kinds(module: nn.Module) -> dict[str, TensorKind]:
    """Map every parameter and buffer name (tied names included) to its kind."""
    return {name: kind for name, kind, _ in _named_tensors(module)}


def tensor_stats(
    tensor: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> TensorStats | None:
    """Return float64 statistics of a tensor, or None when it is empty, complex or has no values."""
    if not _has_values(tensor) or tensor.is_complex() or tensor.numel() == 0:
        return None
    moments = _Moments()
    nonzero = nan = inf = 0
    # One float64 buffer reused for every chunk: no allocation, no page faults per chunk.
    buffer = _workspace(tensor, chunk_elements)
    for chunk in _chunks(tensor.detach(), chunk_elements):
        x = buffer[: chunk.numel()].copy_(chunk)
        nonzero += int(torch.count_nonzero(chunk))
        total = float(x.sum())
        if not math.isfinite(total):  # NaN or Inf inside (or an overflow): mask, the slow path
            finite = torch.isfinite(chunk)
            n_finite, chunk_nan = (int(torch.count_nonzero(m)) for m in (finite, chunk.isnan()))
            nan, inf = nan + chunk_nan, inf + chunk.numel() - n_finite - chunk_nan
            x = x[finite]
            total = float(x.sum())
        moments.add(x, total)
    count, mean, m2 = moments.count, moments.mean, moments.m2
    some = count > 0
    return TensorStats(
        mean=mean if some else None,
        std=math.sqrt(m2 / (count - 1)) if count > 1 else None,
        min=moments.low if some else None,
        max=moments.high if some else None,
        norm=math.sqrt(m2 + count * mean * mean) if some else None,  # sum of squares, no extra pass
        zero_fraction=(tensor.numel() - nonzero) / tensor.numel(),
        finite=count,
        nan_count=nan,
        inf_count=inf,
    )


class _Moments:
    """Running count, mean, sum of squared deviations (m2), min and max over float64 chunks."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, x: torch.Tensor, total: float) -> None:
        """Fold in a finite float64 chunk with sum ``total``; ``x`` is scratch and is modified."""
        n = x.numel()
        if n == 0:
            return
        low, high = (float(v) for v in torch.aminmax(x))
        # Finite values near 1e308 can overflow the sum: then work on x / max|x| instead.
        scale = 1.0 if math.isfinite(total) else max(-low, high)
        if scale != 1.0:
            total = float(x.div_(scale).sum())
        mean = total / n
        x.sub_(mean)  # two-pass deviations, in place: no temporary
        mean, m2 = mean * scale, float(torch.dot(x, x)) * scale * scale
        # Chan et al.'s pairwise combine: stable where a running sum of squares is not.
        delta, count = mean - self.mean, self.count + n
        self.mean += delta * n / count
        self.m2 += m2 + delta * delta * self.count * n / count
        self.count, self.low, self.high = count, min(self.low, low), max(self.high, high)


def tensor_values(
    source: nn.Module | Mapping[str, torch.Tensor],
    name: str,
    slices: str | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Return a detached, contiguous CPU copy of one tensor, optionally sliced, size-capped."""
    table: dict[str, torch.Tensor] = {}
    if isinstance(source, nn.Module):
        table.update(source.named_parameters(remove_duplicate=False))
        table.update(source.named_buffers(remove_duplicate=False))
    else:
        table.update(source)
    if name not in table:
        raise TensorNotFoundError(name, table)
    tensor = table[name].detach()
    if not _has_values(tensor):
        raise TensorNotMaterializedError(name)
    # A blank string selects everything, as proto3's default empty string should.
    if slices and slices.strip():
        tensor = tensor[parse_slices(slices, tuple(tensor.shape))]
    if tensor.numel() > max_elements:
        raise TooLargeError(name, tensor.numel(), max_elements)
    return tensor.to("cpu", memory_format=torch.contiguous_format, copy=True)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major element bytes of a CPU tensor, any dtype (bfloat16 and bool included)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)  # one byte per element, 0 or 1, whatever the platform
    # A uint8 view reinterprets the storage; numpy has no bfloat16 or float8 to go through.
    return flat.view(torch.uint8).numpy().tobytes()


def parse_slices(text: str, shape: Sequence[int]) -> tuple[int | slice | EllipsisType, ...]:
    """Parse a numpy-style index such as ``'0:2, :, 3'`` for ``shape``, without eval."""
    if len(text) > _MAX_SLICE_CHARS:
        raise InvalidSliceError(text[:40] + "...", f"longer than {_MAX_SLICE_CHARS} characters")
    items = [item.strip() for item in text.split(",")]
    ellipses = items.count("...")
    if ellipses > 1:
        raise InvalidSliceError(text, "'...' may appear only once")
    if len(items) - ellipses > len(shape):
        reason = f"it indexes {len(items) - ellipses} dimensions but the tensor has {len(shape)}"
        raise InvalidSliceError(text, reason)
    ellipsis_at = items.index("...") if ellipses else len(items)
    index: list[int | slice | EllipsisType] = []
    for pos, item in enumerate(items):
        if pos == ellipsis_at:
            index.append(Ellipsis)
            continue
        # Items after '...' index the trailing dimensions.
        dim = pos if pos < ellipsis_at else len(shape) - (len(items) - pos)
        index.append(_parse_item(text, item, dim, shape[dim]))
    return tuple(index)


def diff_state_dicts(
    base: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    kinds: Mapping[str, TensorKind] | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> StateDiff:
    """Compare ``other`` against ``base`` key by key, in float64 and chunk by chunk.

    ``kinds`` tags each entry as parameter or buffer (see `tensor_kinds`); "" when absent.
    """
    kinds = kinds or {}
    entries = tuple(
        _diff_entry(key, kinds.get(key, ""), base[key], other[key], chunk_elements)
        for key in base
        if key in other
    )
    changed = sum(entry.changed for entry in entries)
    return StateDiff(
        entries=entries,
        only_base=tuple(key for key in base if key not in other),
        only_other=tuple(key for key in other if key not in base),
        compared=len(entries),
        changed=changed,
        unchanged=len(entries) - changed,
        mismatched=sum(entry.metrics is None for entry in entries),
    )


def _diff_entry(
    name: str, kind: TensorKind, a: torch.Tensor, b: torch.Tensor, chunk_elements: int
) -> TensorDiff:
    """Diff one pair of tensors (base a, other b); a shape or dtype mismatch skips the numbers."""
    shape_mismatch, dtype_mismatch = a.shape != b.shape, a.dtype != b.dtype
    metrics = None
    if not (shape_mismatch or dtype_mismatch):
        for tensor in (a, b):
            if not _has_values(tensor):
                raise TensorNotMaterializedError(name)
        metrics = _diff_metrics(a.detach(), b.detach(), chunk_elements)
    changed = metrics is None or metrics.changed_elements > 0
    return TensorDiff(
        name=name,
        kind=kind,
        shape_base=tuple(a.shape),
        shape_other=tuple(b.shape),
        dtype_base=_dtype_name(a.dtype),
        dtype_other=_dtype_name(b.dtype),
        shape_mismatch=shape_mismatch,
        dtype_mismatch=dtype_mismatch,
        changed=changed,
        metrics=metrics,
    )


def _diff_metrics(a: torch.Tensor, b: torch.Tensor, chunk_elements: int) -> DiffMetrics:
    """Count and measure the differences between two tensors of one shape and dtype."""
    if a.is_complex():  # compare (real, imaginary) pairs
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    buffer_a, buffer_b = _workspace(a, chunk_elements), _workspace(a, chunk_elements)
    changed = nonfinite = 0
    sq_diff = sq_a = max_diff = 0.0
    for xa, xb in zip(_chunks(a, chunk_elements), _chunks(b, chunk_elements), strict=True):
        xb = xb.to(xa.device)
        da = buffer_a[: xa.numel()].copy_(xa)
        diff = buffer_b[: xa.numel()].copy_(xb).sub_(da)
        chunk = _diff_chunk(xa, xb, da, diff)
        changed, nonfinite = changed + chunk[0], nonfinite + chunk[1]
        sq_diff, sq_a, max_diff = sq_diff + chunk[2], sq_a + chunk[3], max(max_diff, chunk[4])
    norm_a, diff_norm = math.sqrt(sq_a), math.sqrt(sq_diff)
    relative = diff_norm / norm_a if norm_a > 0 else (0.0 if diff_norm == 0 else None)
    return DiffMetrics(changed, nonfinite, norm_a, diff_norm, relative, max_diff)


def _diff_chunk(
    xa: torch.Tensor, xb: torch.Tensor, da: torch.Tensor, diff: torch.Tensor
) -> tuple[int, int, float, float, float]:
    """Return (changed, non-finite changed, squared diff norm, squared norm of a, max |diff|)."""
    ne = xa != xb  # exact, in the original dtype (float64 would merge large int64s)
    sq_a, sq_diff = float(torch.dot(da, da)), float(torch.dot(diff, diff))
    nonfinite = 0
    if not (math.isfinite(sq_a) and math.isfinite(sq_diff)):  # NaN or Inf: mask, the slow path
        ne &= ~(xa.isnan() & xb.isnan())  # a NaN left in place is no change
        both_finite = torch.isfinite(xa) & torch.isfinite(xb)
        nonfinite = int(torch.count_nonzero(ne & ~both_finite))
        diff = torch.where(both_finite, diff, 0.0)
        da = torch.where(torch.isfinite(xa), da, 0.0)
        sq_a, sq_diff = float(torch.dot(da, da)), float(torch.dot(diff, diff))
    low, high = (float(v) for v in torch.aminmax(diff))
    return int(torch.count_nonzero(ne)), nonfinite, sq_diff, sq_a, max(-low, high)


def _parse_item(text: str, item: str, dim: int, size: int) -> int | slice:
    """Parse one comma-separated item: an integer, or start:stop[:step] with optional parts."""
    if ":" not in item:
        index = _parse_int(text, item)
        if index is None:
            raise InvalidSliceError(text, f"the entry for dimension {dim} is empty")
        if not -size <= index < size:
            reason = f"index {index} is out of range for dimension {dim} of size {size}"
            raise InvalidSliceError(text, reason)
        return index
    parts = [_parse_int(text, part.strip()) for part in item.split(":")]
    if len(parts) > 3:
        raise InvalidSliceError(text, f"{item!r} has more than two colons")
    start, stop, step = parts + [None] * (3 - len(parts))
    # torch has no negative steps, and a zero step selects nothing meaningful.
    if step is not None and step <= 0:
        raise InvalidSliceError(text, f"step {step} in {item!r} must be positive")
    # Bounds in exact integers: torch multiplies a huge step into an int64 stride, which
    # overflows. A step past the size picks the start alone, as the size itself does.
    first, last, stride = slice(start, stop, step).indices(size)
    return slice(first, last, min(stride, max(size, 1)))


# Up to 19 digits, as many as int64 has: bounds and steps are applied in exact integers
# (slice.indices), so a step of 10**19 - 1 selects what Python would, not an overflow.
SLICE_NUMBER_MAX = 10**19 - 1


def _parse_int(text: str, part: str) -> int | None:
    """Return the integer in ``part``, None when it is empty; reject anything else."""
    if not part:
        return None
    try:
        return parse_int(part, "a slice bound", -SLICE_NUMBER_MAX, SLICE_NUMBER_MAX)
    except InvalidNumberError:
        reason = f"{part!r} is not an integer, a slice like 1:5:2, ':' or '...'"
        raise InvalidSliceError(text, reason) from None


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, TensorKind, torch.Tensor]]:
    """Yield every parameter and buffer in state_dict order, tied names included."""
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name, param in mod.named_parameters(prefix, recurse=False, remove_duplicate=False):
            yield name, "parameter", param
        for name, buf in mod.named_buffers(prefix, recurse=False, remove_duplicate=False):
            yield name, "buffer", buf


def _tally(tensors: Iterable[torch.Tensor]) -> tuple[int, int, int, int]:
    """Return (elements, trainable elements, bytes, tensors), counting each alias once."""
    seen: set[Hashable] = set()
    elements = trainable = nbytes = count = 0
    for tensor in tensors:
        key = _alias_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        elements += tensor.numel()
        trainable += tensor.numel() if tensor.requires_grad else 0
        nbytes += tensor.numel() * tensor.element_size()
        count += 1
    return elements, trainable, nbytes, count


def _alias_key(tensor: torch.Tensor) -> Hashable:
    """Return a key equal for two tensors exactly when they view the same elements."""
    if not _has_values(tensor) or tensor.numel() == 0:
        return id(tensor)  # meta and empty tensors have no meaningful address
    storage = tensor.untyped_storage().data_ptr()
    return (
        str(tensor.device),
        storage,
        tensor.storage_offset(),
        tensor.shape,
        tensor.stride(),
        tensor.dtype,
    )


def _has_values(tensor: torch.Tensor) -> bool:
    """Tell whether the tensor holds readable dense values (not meta, sparse or quantized)."""
    return (
        tensor.device.type != "meta" and tensor.layout == torch.strided and not tensor.is_quantized
    )


def _workspace(tensor: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Return a float64 scratch buffer big enough for one chunk of ``tensor``."""
    return torch.empty(
        min(chunk_elements, tensor.numel()), dtype=torch.float64, device=tensor.device
    )


def _chunks(tensor: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Yield 1-D pieces of at most ``size`` elements in row-major order, as views where possible.

    Boundaries depend on the shape alone, so two tensors of one shape are chunked alike.
    """
    if size < 1:
        raise ValueError(f"chunk_elements must be positive, not {size}")
    if tensor.numel() == 0:
        return
    if tensor.dim() <= 1:
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), size):
            yield flat[start : start + size]
        return
    row = tensor[0].numel()
    if row > size:
        for sub in tensor:
            yield from _chunks(sub, size)
        return
    step = size // row
    for start in range(0, tensor.shape[0], step):
        # A view of a contiguous tensor; a copy of at most `size` elements otherwise.
        yield tensor[start : start + step].reshape(-1)


def _dtype_name(dtype: torch.dtype) -> str:
    """Return ``'float32'`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")
