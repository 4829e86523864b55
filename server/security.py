"""Bearer-token checks for mutating RPCs, and TLS credentials from files."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from moduleserve.server.errors import PermissionDeniedError, UnauthenticatedError


class Authorizer:
    """Accepts a call when no tokens are configured or its bearer token is one of them."""

    def __init__(self, tokens: Sequence[str], read_tokens: Sequence[str] = ()) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        self._read_tokens = [t.encode() for t in read_tokens if t]

    @property
    def enabled(self) -> bool:
        """Whether tokens are required at all."""
        return bool(self._tokens)

    def check(self, context: grpc.aio.ServicerContext) -> None:
        """Raise UnauthenticatedError / PermissionDeniedError unless the call may mutate."""
        self.check_header(authorization_of(context.invocation_metadata()))

    def check_header(self, authorization: str | None) -> None:
        """`check` for a front end that has the `authorization` header's value at hand."""
        _require_token(authorization, self._tokens, "this call changes the server")

    def check_read(self, context: grpc.aio.ServicerContext) -> None:
        """Reads are open unless read tokens are configured; then any token (read or admin)."""
        if self._read_tokens:
            _require_token(
                authorization_of(context.invocation_metadata()),
                [*self._read_tokens, *self._tokens],
                "reading jobs",
            )


def authorization_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` metadata value of a call, if it sent one."""
    found = None
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            found = value
    return found


def _require_token(header: str | None, tokens: Sequence[bytes], what: str) -> None:
    """Raise unless `header` carries one of `tokens` (nothing to check when there are none)."""
    if not tokens:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise UnauthenticatedError(
            f"{what}: send an 'authorization: Bearer <token>' header (gRPC metadata)"
        )
    # compare_digest against every token: no early exit that would leak timing.
    if not any(hmac.compare_digest(token.encode(), known) for known in tokens):
        raise PermissionDeniedError("the bearer token is not one of the server's tokens")


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """TLS credentials from PEM files."""
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
