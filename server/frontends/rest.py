"""The KServe V2 REST/JSON protocol (with Triton's extensions) as an ASGI application over
`DataPlane`: a small router over path segments, no web framework.

Routes (Triton's): GET /v2, /v2/health/{live,ready}, /v2/models/M[/versions/V][/ready,
/config, /stats], /v2/models/stats; POST /v2/models/M[/versions/V]/infer,
/v2/repository/index, /v2/repository/models/M/{load,unload}. Errors are `{"error": …}`
with the HTTP status of the domain error's gRPC code (`rest_http.HTTP_STATUS`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.dataplane import DataPlane
from moduleserve.server.frontends.rest_http import (
    DEFAULT_MAX_BODY_BYTES,
    JSON_HEADERS,
    HttpError,
    Receive,
    Scope,
    Send,
    dumps,
    error_response,
    header,
    json_object,
    read_body,
    send_response,
)
from moduleserve.server.frontends.rest_infer import decode_request, encode_response
from moduleserve.server.frontends.rest_json import (
    index_json,
    model_config_json,
    model_metadata_json,
    server_metadata_json,
    statistics_json,
)
from moduleserve.server.security import HTTP_CARRIER, Authorizer, rest_access

BINARY_HEADERS = [(b"content-type", b"application/octet-stream")]

# Measured (bench/rest_json.py): a hop to a worker thread and back costs ~50 µs; msgspec
# decodes ~5 µs per KiB and encodes ~0.1 µs per value. Below these sizes the work is
# shorter than a few hops, so it stays on the event loop; above, it runs in a thread, in
# slices (rest_sliced.py, rest_infer.py) so that the thread holds the GIL briefly at a time.
INLINE_BODY_BYTES = 64 * 1024
INLINE_OUTPUT_VALUES = 4096


@dataclass
class Call:
    """One routed request: what the path named, and the means to read its body."""

    scope: Scope
    receive: Receive
    model: str = ""
    version: str = ""
    route: str = ""
    """The route's pattern (as `routes()` gives it): its access is security.REST_ACCESS's."""


@dataclass
class Reply:
    status: int
    body: list[bytes]
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: list(JSON_HEADERS))


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status, [dumps(value)])


class _Disconnected(Exception):
    """The client left before its body arrived: nothing to answer."""


Handler = Callable[["RestApp", Call], Awaitable[Reply]]
_T = TypeVar("_T")


class RestApp:
    """ASGI callable answering the V2 REST protocol for one DataPlane."""

    def __init__(
        self, plane: DataPlane, auth: Authorizer, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ) -> None:
        self.plane = plane
        self.auth = auth
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # nothing to start: the App owns the data plane
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"RestApp serves HTTP only, not {scope['type']!r}")
        try:
            method, handler, call = self._route(scope, receive)
            if scope["method"] != method:
                raise HttpError(
                    405,
                    f"{scope['method'][:16]} is not allowed on {scope['path'][:200]}; use {method}",
                    [(b"allow", method.encode())],
                )
            # The one access check of every route (no handler checks tokens itself).
            what = f"{method} {scope['path'][:200]}"
            self.auth.require(rest_access(method, call.route), _auth(call), what, HTTP_CARRIER)
            reply = await handler(self, call)
        except _Disconnected:
            return
        except Exception as exc:
            status, sentence, headers = error_response(exc, scope)
            exc.__traceback__ = None  # a shared load failure must not keep this request alive
            reply = Reply(status, [dumps({"error": sentence})], [*JSON_HEADERS, *headers])
        await send_response(send, reply.status, reply.body, reply.headers)

    def _route(self, scope: Scope, receive: Receive) -> tuple[str, Handler, Call]:
        """(the method the path accepts, its handler, the call); unknown paths are 404."""
        parts = scope["path"].strip("/").split("/")
        call = Call(scope, receive)
        if parts[0] == "v2":
            rest = parts[1:]
            if not rest:
                call.route = "/v2"
                return "GET", RestApp._server_metadata, call
            found = _FIXED.get(tuple(rest))
            if found is not None:
                call.route = _fixed_route(rest)
                return (*found, call)
            if len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[3] in _REPO:
                call.model, call.route = rest[2], _repo_route(rest[3])
                return "POST", _REPO[rest[3]], call
            if len(rest) >= 2 and rest[0] == "models" and rest[1]:
                call.model, tail = rest[1], rest[2:]
                if len(tail) >= 2 and tail[0] == "versions" and tail[1]:
                    call.version, tail = tail[1], tail[2:]
                if len(tail) <= 1:
                    found = _MODEL.get(tail[0] if tail else "")
                    if found is not None:
                        call.route = _model_route(tail[0] if tail else "")
                        return (*found, call)
        raise HttpError(404, f"no such endpoint: {scope['path'][:200]}")

    async def _body(self, call: Call) -> bytes:
        body = await read_body(call.scope, call.receive, self.max_body_bytes)
        if body is None:
            raise _Disconnected
        return body

    # --- health and metadata ---

    async def _live(self, call: Call) -> Reply:
        return json_reply({"live": True})

    async def _ready(self, call: Call) -> Reply:
        ready = self.plane.ready
        return json_reply({"ready": ready}, 200 if ready else 400)

    async def _server_metadata(self, call: Call) -> Reply:
        return json_reply(server_metadata_json(self.plane.server_metadata()))

    async def _model_ready(self, call: Call) -> Reply:
        ready = await self.plane.model_ready(call.model, call.version)
        return json_reply({"name": call.model, "ready": ready}, 200 if ready else 400)

    async def _model_metadata(self, call: Call) -> Reply:
        return json_reply(
            model_metadata_json(await self.plane.model_metadata(call.model, call.version))
        )

    async def _model_config(self, call: Call) -> Reply:
        return json_reply(
            model_config_json(await self.plane.model_config(call.model, call.version))
        )

    async def _statistics(self, call: Call) -> Reply:
        return json_reply(statistics_json(await self.plane.statistics(call.model, call.version)))

    # --- inference ---

    async def _infer(self, call: Call) -> Reply:
        body = await self._body(call)
        length = header(call.scope, b"inference-header-content-length")
        request = await _off_loop_if(len(body) > INLINE_BODY_BYTES, decode_request, body, length)
        del body  # the inputs view it; nothing else needs the whole body from here on
        result = await self.plane.infer(
            call.model,
            call.version,
            request.inputs,
            requested=request.requested,
            deadline=request.deadline,
            priority=request.priority,
        )
        values = sum(t.numel() for t in result.outputs.values())
        parts, header_length = await _off_loop_if(
            values > INLINE_OUTPUT_VALUES, encode_response, call.model, request, result
        )
        if header_length == sum(len(part) for part in parts):  # no binary outputs
            return Reply(200, parts)
        headers = [*BINARY_HEADERS, (b"inference-header-content-length", b"%d" % header_length)]
        return Reply(200, parts, headers)

    # --- the repository extension ---

    async def _json_body(self, call: Call) -> dict[str, Any]:
        body = await self._body(call)
        return await _off_loop_if(len(body) > INLINE_BODY_BYTES, json_object, body)

    async def _index(self, call: Call) -> Reply:
        body = await self._json_body(call)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError("'ready' must be true or false")
        return json_reply(index_json(await self.plane.index(ready_only=ready)))

    async def _load(self, call: Call) -> Reply:
        params = _parameters(await self._json_body(call))
        version = params.get("version", "")
        if isinstance(version, bool) or not isinstance(version, str | int):
            raise InvalidInputError("parameter 'version' must be a version number or alias")
        await self.plane.load(call.model, str(version))
        return Reply(200, [])

    async def _unload(self, call: Call) -> Reply:
        _parameters(await self._json_body(call))  # unload_dependents: nothing depends
        await self.plane.unload(call.model)
        return Reply(200, [])


async def _off_loop_if(condition: bool, fn: Callable[..., _T], *args: Any) -> _T:
    """fn(*args) in a worker thread when `condition` (large work), else right here."""
    return await asyncio.to_thread(fn, *args) if condition else fn(*args)


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInputError("'parameters' must be a JSON object")
    return params


def _auth(call: Call) -> str | None:
    return header(call.scope, b"authorization")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


_FIXED: dict[tuple[str, ...], tuple[str, Handler]] = {
    ("health", "live"): ("GET", RestApp._live),
    ("health", "ready"): ("GET", RestApp._ready),
    ("models", "stats"): ("GET", RestApp._statistics),
    ("repository", "index"): ("POST", RestApp._index),
}
_MODEL: dict[str, tuple[str, Handler]] = {
    "": ("GET", RestApp._model_metadata),
    "ready": ("GET", RestApp._model_ready),
    "config": ("GET", RestApp._model_config),
    "stats": ("GET", RestApp._statistics),
    "infer": ("POST", RestApp._infer),
}
_REPO: dict[str, Handler] = {"load": RestApp._load, "unload": RestApp._unload}


def routes() -> Iterator[tuple[str, str]]:
    """(HTTP method, route pattern) of every route: the keys security.REST_ACCESS must have."""
    yield "GET", "/v2"
    for parts, (method, _) in _FIXED.items():
        yield method, _fixed_route(parts)
    for tail, (method, _) in _MODEL.items():
        yield method, _model_route(tail)
    for action in _REPO:
        yield "POST", _repo_route(action)


def _fixed_route(parts: tuple[str, ...] | list[str]) -> str:
    return "/v2/" + "/".join(parts)


def _model_route(tail: str) -> str:
    return "/v2/models/{model}[/versions/{version}]" + (f"/{tail}" if tail else "")


def _repo_route(action: str) -> str:
    return f"/v2/repository/models/{{model}}/{action}"
