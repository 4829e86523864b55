"""gRPC status codes → typed client exceptions carrying the code, the sentence and request id."""

from __future__ import annotations

import re

import grpc


class ModuleServeError(Exception):
    """An RPC to moduleserve failed; `code` and `details` come from the server.

    `str(error)` is the sentence to show; it differs from `details` only where the client
    rewrote gRPC's own text (a server it could not reach).
    """

    def __init__(self, code: grpc.StatusCode, details: str, message: str | None = None) -> None:
        super().__init__(message or details or code.name)
        self.code, self.details = code, details
        match = re.search(r"request id ([0-9A-Za-z_-]+)", details or "")
        self.request_id = match.group(1) if match else None


class CancelledError(ModuleServeError):
    """The call was cancelled (by the caller, or by a server shutting down)."""


class UnknownError(ModuleServeError):
    """The server failed without a status of its own."""


class InvalidArgumentError(ModuleServeError):
    """The request was malformed: shape, datatype, byte count, name (refused by the server,
    or before sending by the client)."""


class DeadlineExceededError(ModuleServeError):
    """The deadline passed before the request was computed."""


class NotFoundError(ModuleServeError):
    """Unknown model, version, alias, tensor."""


class AlreadyExistsError(ModuleServeError):
    """The name, version or alias is already taken."""


class PermissionDeniedError(ModuleServeError):
    """The token (or the import path) is not allowed."""


class ResourceExhaustedError(ModuleServeError):
    """A queue was full or a message too large: back off and retry."""


class FailedPreconditionError(ModuleServeError):
    """The registry's state does not allow the call."""


class AbortedError(ModuleServeError):
    """A concurrent change won (e.g. an alias moved meanwhile): re-read and retry."""


class OutOfRangeError(ModuleServeError):
    """A value lies past the end of what exists."""


class UnimplementedError(ModuleServeError):
    """The server does not offer this method (an older server, or not moduleserve)."""


class InternalError(ModuleServeError):
    """The server hit a bug; the details carry the request id to find it in its log."""


class UnavailableError(ModuleServeError):
    """The server or model is not ready (loading, shutting down, unreachable)."""


class DataLossError(ModuleServeError):
    """Stored data is missing or corrupt (a blob failed its digest check)."""


class UnauthenticatedError(ModuleServeError):
    """No bearer token was sent for a call that needs one."""


# Every status but OK: the ones our server sends and the ones gRPC itself produces.
ERROR_FOR: dict[grpc.StatusCode, type[ModuleServeError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}

# gRPC's words for a channel that never connected -> what a person needs to read.
_UNREACHABLE_REASONS = (
    ("connection refused", "connection refused"),
    ("dns resolution failed", "the host name does not resolve"),
    ("errors resolving", "the host name does not resolve"),
    ("domain name not found", "the host name does not resolve"),
    ("ssl handshake failed", "the TLS handshake failed"),
    ("timeout occurred", "the connection timed out"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "the network is unreachable"),
    ("failed to connect to all addresses", "no connection could be made"),
)


def unreachable_sentence(target: str, details: str) -> str | None:
    """One sentence naming `target` for a server that could not be reached, else None."""
    text = details.lower()
    for clue, reason in _UNREACHABLE_REASONS:
        if clue in text:
            return f"cannot reach a moduleserve server at {target}: {reason}"
    return None


def from_rpc_error(error: grpc.RpcError, target: str | None = None) -> ModuleServeError:
    """The typed exception for a failed call; `target` names the server when it was unreachable."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    message = None
    if target is not None and code == grpc.StatusCode.UNAVAILABLE:
        message = unreachable_sentence(target, details)
    return ERROR_FOR.get(code, ModuleServeError)(code, details, message)
