"""The token check (every token compared, each level's rules) and the gRPC access wrapper
around every kind of handler, on a real grpc.aio server."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from moduleserve.server.errors import PermissionDeniedError, UnauthenticatedError
from moduleserve.server.security import (
    ADMIN,
    GRPC_CARRIER,
    OPEN,
    READ,
    AccessGuard,
    Authorizer,
    grpc_access,
    guarded,
    rest_access,
)

Code = grpc.StatusCode


def require(auth: Authorizer, access: Any, token: str | None) -> None:
    auth.require(access, f"Bearer {token}" if token else None, "Call", GRPC_CARRIER)


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every token hmac.compare_digest is asked about (it still does the comparing)."""
    seen: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        seen.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    yield seen


@pytest.mark.parametrize("token", ["a1", "a2", "a3", "r1", "r2", "nobody"])
def test_every_token_is_compared_whichever_matches(compared: list[bytes], token: str) -> None:
    auth = Authorizer(["a1", "a2", "a3"], ["r1", "r2"])
    if token == "nobody":
        with pytest.raises(PermissionDeniedError):
            require(auth, READ, token)
    else:
        require(auth, READ, token)
    assert len(compared) == 5 and len(set(compared)) == 5


@pytest.mark.parametrize("token", ["first", "middle", "last"])
def test_any_token_is_accepted(token: str) -> None:
    auth = Authorizer(["first", "middle", "last"], ["reader"])
    require(auth, ADMIN, token)
    require(auth, READ, token)


def test_no_tokens_leave_everything_open() -> None:
    auth = Authorizer([])
    for access in (OPEN, READ, ADMIN):
        require(auth, access, None)
        assert not auth.needs_token(access)


def test_admin_tokens_alone_guard_writes_and_leave_reads_open() -> None:
    auth = Authorizer(["admin"])
    require(auth, READ, None)
    require(auth, OPEN, "anything")
    with pytest.raises(UnauthenticatedError, match=r"^Call needs an admin token: send an "):
        require(auth, ADMIN, None)
    with pytest.raises(
        PermissionDeniedError, match=r"^the bearer token is not one of the server's"
    ):
        require(auth, ADMIN, "wrong")
    require(auth, ADMIN, "admin")


def test_read_tokens_read_and_never_write() -> None:
    auth = Authorizer(["admin"], ["reader"])
    with pytest.raises(UnauthenticatedError, match=r"^Call needs a read or admin token"):
        require(auth, READ, None)
    require(auth, READ, "reader")
    require(auth, READ, "admin")
    with pytest.raises(PermissionDeniedError, match="needs an admin token; the bearer token is a"):
        require(auth, ADMIN, "reader")


def test_read_tokens_without_admin_tokens_leave_no_one_to_write() -> None:
    auth = Authorizer([], ["reader"])
    require(auth, READ, "reader")
    with pytest.raises(UnauthenticatedError):
        require(auth, ADMIN, None)
    with pytest.raises(PermissionDeniedError):
        require(auth, ADMIN, "reader")


@pytest.mark.parametrize("header", ["s3cret", "Basic s3cret", "Bearer", "Bearer  ", ""])
def test_a_header_without_a_bearer_token_is_unauthenticated(header: str) -> None:
    with pytest.raises(UnauthenticatedError, match="'authorization: Bearer <token>' header"):
        Authorizer(["s3cret"]).require(ADMIN, header, "Call", GRPC_CARRIER)


def test_the_scheme_is_case_insensitive() -> None:
    Authorizer(["s3cret"]).require(ADMIN, "bearer s3cret", "Call", GRPC_CARRIER)


def test_a_method_or_route_missing_from_the_table_needs_the_admin_token() -> None:
    assert grpc_access("/no.Such/Method") is ADMIN
    assert rest_access("GET", "/v2/no/such/route") is ADMIN
    assert rest_access("DELETE", "/v2") is ADMIN  # the route is open, but for GET only


def test_no_wrapper_where_no_token_is_needed() -> None:
    handler = grpc.unary_unary_rpc_method_handler(_unary)
    assert guarded(handler, "/no.Such/Method", Authorizer([])) is handler
    assert guarded(handler, "/grpc.health.v1.Health/Check", Authorizer(["a"], ["r"])) is handler
    assert guarded(handler, "/no.Such/Method", Authorizer(["a"])) is not handler


def test_a_sync_handler_cannot_be_guarded() -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    with pytest.raises(TypeError, match="only async handlers can be guarded"):
        guarded(handler, "/no.Such/Method", Authorizer(["a"]))


# --- the wrapper around each kind of handler, on a real grpc.aio server -------------------------


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request + b"!"


async def _server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield request
    yield request


async def _server_writes(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(request)  # health's Watch answers this way


async def _client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> bytes:
    return b"".join([r async for r in requests])


async def _bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
    "ServerWrites": grpc.unary_stream_rpc_method_handler(_server_writes),
    "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
}
EXPECTED = {
    "Unary": [b"x!"],
    "ServerStream": [b"x", b"x"],
    "ServerWrites": [b"x"],
    "ClientStream": [b"x"],
    "Bidi": [b"x"],
}


async def _call(channel: grpc.aio.Channel, path: str, token: str | None) -> list[bytes]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    kind = path.rsplit("/", 1)[1]
    if kind == "Unary":
        return [await channel.unary_unary(path)(b"x", metadata=metadata, timeout=10)]
    if kind in ("ServerStream", "ServerWrites"):
        return [r async for r in channel.unary_stream(path)(b"x", metadata=metadata, timeout=10)]
    if kind == "ClientStream":
        return [await channel.stream_unary(path)(iter([b"x"]), metadata=metadata, timeout=10)]
    call = channel.stream_stream(path)(iter([b"x"]), metadata=metadata, timeout=10)
    return [r async for r in call]


@pytest.mark.parametrize("registration", ["registered", "generic"])
async def test_every_kind_of_handler_is_guarded(registration: str) -> None:
    """Methods this test makes up, so none is in the table: each needs the admin token."""
    server = grpc.aio.server()
    guard = AccessGuard(server, Authorizer(["admin"], ["reader"]))
    if registration == "registered":
        guard.add_registered_method_handlers("test.Kinds", HANDLERS)
    else:
        guard.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Kinds", HANDLERS)]
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for kind, expected in EXPECTED.items():
                path = f"/test.Kinds/{kind}"
                for token, code in (
                    (None, Code.UNAUTHENTICATED),
                    ("reader", Code.PERMISSION_DENIED),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await _call(channel, path, token)
                    assert refused.value.code() == code, (kind, token)
                assert await _call(channel, path, "admin") == expected, kind
    finally:
        await server.stop(None)
