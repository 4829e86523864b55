"""gRPC status codes → typed client exceptions carrying the code, the sentence and request id."""

from __future__ import annotations

import re

import grpc


class ModuleServeError(Exception):
    """An RPC to moduleserve failed; `code` and `details` come from the server."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details or code.name)
        self.code, self.details = code, details
        match = re.search(r"request id ([0-9A-Za-z_-]+)", details or "")
        self.request_id = match.group(1) if match else None


class NotFoundError(ModuleServeError):
    """Unknown model, version, alias, tensor."""


class InvalidArgumentError(ModuleServeError):
    """The request was malformed: shape, datatype, byte count, name."""


class ResourceExhaustedError(ModuleServeError):
    """A queue was full or a message too large: back off and retry."""


class DeadlineExceededError(ModuleServeError):
    """The deadline passed before the request was computed."""


class UnavailableError(ModuleServeError):
    """The server or model is not ready (loading, shutting down, unreachable)."""


class UnauthenticatedError(ModuleServeError):
    """No bearer token was sent for a call that needs one."""


class PermissionDeniedError(ModuleServeError):
    """The token (or the import path) is not allowed."""


class FailedPreconditionError(ModuleServeError):
    """The registry's state does not allow the call."""


class AlreadyExistsError(ModuleServeError):
    """The name, version or alias is already taken."""


class AbortedError(ModuleServeError):
    """A concurrent change won (e.g. an alias moved meanwhile): re-read and retry."""


class DataLossError(ModuleServeError):
    """Stored data is missing or corrupt (a blob failed its digest check)."""


ERROR_FOR: dict[grpc.StatusCode, type[ModuleServeError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def from_rpc_error(error: grpc.RpcError) -> ModuleServeError:
    """The typed exception for a failed call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return ERROR_FOR.get(code, ModuleServeError)(code, details or "")
