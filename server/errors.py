"""Server errors: plain classes carrying the facts, never transport status codes."""

from __future__ import annotations

from collections.abc import Sequence

from moduleserve.registry.errors import InvalidInputError, shorten

# What a sentence quotes of a client-chosen name (model, tensor): enough to recognise it.
QUOTED_CHARS = 64


def _shape(shape: Sequence[int]) -> str:
    """Render a shape the way users write it: [-1, 3, 8, 8]."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _model(model: str, version: str | None) -> str:
    """Render "model 'm'" or "model 'm' version 3"."""
    quoted = shorten(model, QUOTED_CHARS)
    return f"model {quoted!r}" if not version else f"model {quoted!r} version {version}"


class ServerError(Exception):
    """Base class of every error the server raises on purpose."""


class InvalidTensorError(ServerError, InvalidInputError):
    """A request tensor is malformed; the sentence names the tensor.

    One of the `InvalidInputError` family (registry/errors.py), which maps to
    INVALID_ARGUMENT as a whole; a malformed request that names no tensor raises
    `InvalidInputError` itself.
    """

    def __init__(self, tensor: str, reason: str) -> None:
        super().__init__(f"input {shorten(tensor, QUOTED_CHARS)!r}: {reason}")
        self.tensor, self.reason = tensor, reason


class ShapeMismatchError(InvalidTensorError):
    """A tensor's shape does not fit the model's input spec (-1 matches any size)."""

    def __init__(self, tensor: str, expected: Sequence[int], received: Sequence[int]) -> None:
        super().__init__(tensor, f"expected shape {_shape(expected)}, got {_shape(received)}")
        self.expected, self.received = tuple(expected), tuple(received)


class DtypeError(InvalidTensorError):
    """A tensor's datatype is not the one the model's input spec names."""

    def __init__(self, tensor: str, expected: str, received: str) -> None:
        super().__init__(tensor, f"expected datatype {expected}, got {received}")
        self.expected, self.received = expected, received


class ByteCountError(InvalidTensorError):
    """Raw tensor bytes do not match shape x element size."""

    def __init__(
        self, tensor: str, expected: int, received: int, datatype: str, shape: Sequence[int]
    ) -> None:
        super().__init__(
            tensor,
            f"expected {expected} bytes of {datatype} data for shape {_shape(shape)}, "
            f"got {received}",
        )
        self.expected, self.received = expected, received
        self.datatype, self.shape = datatype, tuple(shape)


class QueueFullError(ServerError):
    """A model's batching queue is full: the caller should back off and retry."""

    def __init__(self, model: str, size: int) -> None:
        super().__init__(f"model {model!r}: queue is full ({size} requests waiting), retry later")
        self.model, self.size = model, size


class DeadlineExceededError(ServerError):
    """A request's deadline passed before its forward pass started."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r}: deadline passed before the request was computed")
        self.model = model


class ModelLoadingError(ServerError):
    """A model is still loading (or failed to load) and cannot serve yet."""

    def __init__(self, model: str, version: str | None = None, reason: str = "is loading") -> None:
        super().__init__(f"{_model(model, version)} {reason}")
        self.model, self.version, self.reason = model, version, reason


class CheckpointMismatchError(ModelLoadingError):
    """A version's checkpoint no longer fits its class (the class changed since the push)."""


class ModelClassNotAllowedError(ModelLoadingError):
    """A version's class lies outside the server's allowed class prefixes."""


def _mib(nbytes: int) -> str:
    """Bytes as MiB with three significant digits: 0.0153 MiB, 4.2 MiB, 4096 MiB."""
    return f"{nbytes / 2**20:.3g} MiB"


class MemoryBudgetFullError(ServerError):
    """A model does not fit the memory budget beside the models loaded explicitly, which no
    load evicts: an operator must unload one of them, or give the server a larger budget."""

    def __init__(
        self,
        model: str,
        version: str | None,
        need: int,
        budget: int,
        held: int,
        pinned: Sequence[str],
    ) -> None:
        names = ", ".join(pinned[:5]) + (f" and {len(pinned) - 5} more" if len(pinned) > 5 else "")
        super().__init__(
            f"{_model(model, version)} needs {_mib(need)}, but models loaded explicitly "
            f"({names}) hold {_mib(held)} of the {_mib(budget)} memory budget; unload one "
            "of them or raise --memory-budget-mb"
        )
        self.model, self.version = model, version
        self.need, self.budget, self.held, self.pinned = need, budget, held, tuple(pinned)


class ModelOutputError(ServerError):
    """A model's forward() returned what its class cannot serve: another number of tensors
    than it declares, something that is not a tensor, or not one row per input row along
    dimension 0 (so the batch cannot be split back into requests). The model's code is at
    fault: no retry helps, and the request was fine."""

    def __init__(self, model: str, version: str | None, class_name: str, reason: str) -> None:
        quoted = shorten(class_name, QUOTED_CHARS)
        super().__init__(f"{_model(model, version)}: its class {quoted!r} {reason}")
        self.model, self.version, self.class_name, self.reason = model, version, class_name, reason


class ModelNotReadyError(ServerError):
    """A model is not accepting requests (unloaded, stopping, or never started)."""

    def __init__(
        self, model: str, version: str | None = None, reason: str = "is not ready"
    ) -> None:
        super().__init__(f"{_model(model, version)} {reason}")
        self.model, self.version, self.reason = model, version, reason


class UnauthenticatedError(ServerError):
    """A mutating call came without a bearer token while tokens are configured."""


class PermissionDeniedError(ServerError):
    """A bearer token was given but is not one of the configured tokens."""
