"""Who may call what: one table for every gRPC method and REST route, the bearer-token check
that applies it, the wrapper every gRPC handler is registered through, and TLS credentials.

Three levels (README "Security" says why each call has the one it has):

- `open`: anyone, always (probes, health, reflection, server metadata).
- `read`: when read tokens are configured, a read or an admin token; otherwise anyone. Calls
  that return registry, job or model contents, weights above all, and inference.
- `admin`: when any tokens are configured, an admin token; otherwise anyone. Every call that
  changes something (load/unload, jobs, dataset uploads).

The gRPC table is applied by `AccessGuard`, through which `Core.add_services` registers every
handler for both front ends; the REST table by `RestApp`'s dispatch. A method or route with no
entry needs the admin token (closed, not open), and a test fails on it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from moduleserve.client.oip import OIP_SERVICE
from moduleserve.server.errors import PermissionDeniedError, UnauthenticatedError
from moduleserve.server.status import status_for

logger = logging.getLogger(__name__)


class Access(enum.Enum):
    """What a call needs: see the module docstring."""

    OPEN = "open"
    READ = "read"
    ADMIN = "admin"


OPEN, READ, ADMIN = Access.OPEN, Access.READ, Access.ADMIN

# The Open Inference Protocol, served under Triton's wire name and under our proto package's.
OIP_SERVICES = (OIP_SERVICE, "moduleserve.oip.v2.GRPCInferenceService")
_OIP_ACCESS: dict[str, Access] = {
    # Kubernetes and KServe probe these without credentials; they tell only up/ready.
    "ServerLive": OPEN,
    "ServerReady": OPEN,
    "ModelReady": OPEN,
    # Name, version and protocol extensions: nothing of the registry.
    "ServerMetadata": OPEN,
    # Registry contents (inputs, versions, batching, counters, every model's name).
    "ModelMetadata": READ,
    "ModelConfig": READ,
    "ModelStatistics": READ,
    "RepositoryIndex": READ,
    # Runs our models on the caller's inputs: protected by read tokens when they are set (open
    # otherwise, as Triton's, which leaves inference to the gateway in front of it).
    "ModelInfer": READ,
    "RepositoryModelLoad": ADMIN,
    "RepositoryModelUnload": ADMIN,
}

GRPC_ACCESS: dict[str, Access] = {
    **{
        f"/{service}/{name}": access
        for service in OIP_SERVICES
        for name, access in _OIP_ACCESS.items()
    },
    # Weights and their statistics are data: as readable as the registry, no more.
    "/moduleserve.v1.Introspection/GetModuleTree": READ,
    "/moduleserve.v1.Introspection/ListTensors": READ,
    "/moduleserve.v1.Introspection/GetTensor": READ,
    "/moduleserve.v1.Introspection/DiffVersions": READ,
    "/moduleserve.v1.Jobs/CreateJob": ADMIN,
    "/moduleserve.v1.Jobs/CancelJob": ADMIN,
    # Registers a new version, and moves an alias when asked to.
    "/moduleserve.v1.Jobs/PromoteJob": ADMIN,
    "/moduleserve.v1.Jobs/GetJob": READ,
    "/moduleserve.v1.Jobs/ListJobs": READ,
    "/moduleserve.v1.Jobs/WatchJob": READ,
    "/moduleserve.v1.Jobs/ListJobEvents": READ,
    "/moduleserve.v1.Datasets/UploadDataset": ADMIN,
    "/moduleserve.v1.Datasets/ListDatasets": READ,
    # Health stays open (DESIGN): Envoy, Kubernetes and `moduleserve health` check it without
    # a token. List is not implemented by grpcio's asyncio servicer (UNIMPLEMENTED).
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.health.v1.Health/List": OPEN,
    # Service and message schemas (the .proto files we publish), no data: open for grpcurl.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": OPEN,
}

# REST routes (server/frontends/rest.py) as (HTTP method, route pattern); the same decisions
# as for their gRPC twins. `[/versions/{version}]`: with or without a version.
_MODEL_ROUTE = "/v2/models/{model}[/versions/{version}]"
REST_ACCESS: dict[tuple[str, str], Access] = {
    ("GET", "/v2"): OPEN,  # ServerMetadata
    ("GET", "/v2/health/live"): OPEN,
    ("GET", "/v2/health/ready"): OPEN,
    ("GET", f"{_MODEL_ROUTE}/ready"): OPEN,
    ("GET", _MODEL_ROUTE): READ,  # ModelMetadata
    ("GET", f"{_MODEL_ROUTE}/config"): READ,
    ("GET", f"{_MODEL_ROUTE}/stats"): READ,
    ("GET", "/v2/models/stats"): READ,
    ("POST", "/v2/repository/index"): READ,
    ("POST", f"{_MODEL_ROUTE}/infer"): READ,
    ("POST", "/v2/repository/models/{model}/load"): ADMIN,
    ("POST", "/v2/repository/models/{model}/unload"): ADMIN,
}

GRPC_CARRIER = "header (gRPC metadata)"
HTTP_CARRIER = "HTTP header"


def grpc_access(method: str) -> Access:
    """The access a gRPC method needs; one missing from the table needs the admin token."""
    return GRPC_ACCESS.get(method, ADMIN)


def rest_access(method: str, route: str) -> Access:
    """The access a REST route needs; one missing from the table needs the admin token."""
    return REST_ACCESS.get((method, route), ADMIN)


class Authorizer:
    """Decides, from the configured tokens, whether a call's bearer token grants an access."""

    def __init__(self, tokens: Sequence[str], read_tokens: Sequence[str] = ()) -> None:
        self._admin = [_digest(t) for t in tokens if t]
        self._read = [_digest(t) for t in read_tokens if t]

    def needs_token(self, access: Access) -> bool:
        """Whether a call needing `access` must carry a token at all."""
        if access is ADMIN:
            # Read tokens alone do not leave writes open: then no token may write.
            return bool(self._admin or self._read)
        return access is READ and bool(self._read)

    def require(self, access: Access, authorization: str | None, call: str, carrier: str) -> None:
        """Raise UnauthenticatedError (no bearer token) or PermissionDeniedError (a token that
        does not grant `access`) unless the `authorization` value lets `call` through.

        `call` names the call and `carrier` where the token goes, for the sentence."""
        if not self.needs_token(access):
            return
        needed = "an admin token" if access is ADMIN else "a read or admin token"
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError(
                f"{call} needs {needed}: send an 'authorization: Bearer <token>' {carrier}"
            )
        digest = _digest(token)
        # Both always compared, against every token: how long this takes does not depend
        # on which token matched, or whether one did.
        is_admin = matches_any(digest, self._admin)
        is_reader = matches_any(digest, self._read)
        if is_admin or (is_reader and access is READ):
            return
        if is_reader:
            raise PermissionDeniedError(
                f"{call} needs an admin token; the bearer token is a read token"
            )
        raise PermissionDeniedError("the bearer token is not one of the server's tokens")


def matches_any(token: bytes, known: Sequence[bytes]) -> bool:
    """Whether `token` is one of `known`, compared with every one of them in constant time
    (never stopping at the first match, as `any` would)."""
    found = False
    for candidate in known:
        found |= hmac.compare_digest(token, candidate)
    return found


def _digest(token: str) -> bytes:
    """Tokens are compared as SHA-256 digests: all of one length, so the comparison's time
    does not tell a token's length either."""
    return hashlib.sha256(token.encode()).digest()


def authorization_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` metadata value of a call, if it sent one."""
    found = None
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            found = value
    return found


# --- the gRPC wrapper -------------------------------------------------------------------------

Handler = Any  # a grpc.RpcMethodHandler (generic in the stubs only)
Refusal = tuple[grpc.StatusCode, str]


class AccessGuard:
    """Registers handlers on `server` (a grpc.aio.Server, or the Envoy codec's HandlerTable),
    each wrapped in the check of its method's table entry: the one place access is applied
    to gRPC, for both front ends, whatever the handler's kind."""

    def __init__(self, server: Any, auth: Authorizer) -> None:
        self._server = server
        self._auth = auth

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_GuardedGeneric(h, self._auth) for h in handlers])

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: guarded(handler, f"/{service}/{name}", self._auth)
                for name, handler in handlers.items()
            },
        )


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose handlers come out guarded (each built once per method: grpc.aio
    asks a generic handler on every call)."""

    def __init__(self, inner: grpc.GenericRpcHandler, auth: Authorizer) -> None:
        self._inner = inner
        self._auth = auth
        self._guarded: dict[str, tuple[Handler, Handler]] = {}  # method: (found, guarded)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        found = self._guarded.get(method)
        if found is None or found[0] is not handler:
            found = self._guarded[method] = (handler, guarded(handler, method, self._auth))
        return found[1]


def guarded(handler: Handler, method: str, auth: Authorizer) -> Handler:
    """`handler` refusing calls whose bearer token does not grant its method's access; the
    handler itself when no token is needed (no cost on open calls, or with no tokens)."""
    access = grpc_access(method)
    if method not in GRPC_ACCESS:
        logger.warning("%s has no entry in the access table: it needs the admin token", method)
    if not auth.needs_token(access):
        return handler
    name = method.rsplit("/", 1)[-1]

    def refusal(context: grpc.aio.ServicerContext) -> Refusal | None:
        try:
            auth.require(
                access, authorization_of(context.invocation_metadata()), name, GRPC_CARRIER
            )
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            code = status_for(exc)
            assert code is not None  # both are in status.STATUS_FOR
            logger.info("%s -> %s: %s", method, code.name, exc)
            return code, str(exc)
        return None

    if handler.request_streaming:
        field = "stream_stream" if handler.response_streaming else "stream_unary"
    else:
        field = "unary_stream" if handler.response_streaming else "unary_unary"
    return handler._replace(**{field: _checking(getattr(handler, field), refusal, method)})


def _checking(
    behavior: Any, refusal: Callable[[grpc.aio.ServicerContext], Refusal | None], method: str
) -> Any:
    """`behavior`, of the same kind (grpc.aio tells async generators from coroutines), first
    aborting the call when `refusal` finds one."""
    if inspect.isasyncgenfunction(behavior):

        async def check_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # An abort's traceback outlives the call (see status.map_errors), whether it is
            # raised here or in `behavior`: this frame must not hold the request then.
            refused = refusal(context)
            if refused is not None:
                del request
                await context.abort(*refused)
            items = behavior(request, context)
            del request
            async for item in items:
                yield item

        return check_stream
    if inspect.iscoroutinefunction(behavior):

        async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refused = refusal(context)  # and the request dropped as in check_stream
            if refused is not None:
                del request
                await context.abort(*refused)
            pending = behavior(request, context)
            del request
            return await pending

        return check
    # Both front ends run asyncio handlers only; a sync one would be run on a thread by
    # grpc.aio and not at all by the codec, so it cannot be guarded the same way.
    raise TypeError(f"{method}: only async handlers can be guarded, not {behavior!r}")


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """TLS credentials from PEM files."""
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
