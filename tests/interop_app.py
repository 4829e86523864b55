"""grpc's interop TestService, served by our gRPC codec as an ASGI application under Envoy.

The messages are grpc's own (grpc/src/proto/grpc/testing/messages.proto, empty.proto:
same names, numbers and types, less the compression and server-id fields no case here
uses), built from a descriptor at import in a pool of their own: no protoc at test time,
and the test process and the Envoy child import the very same module. grpcio ships no
importable copy of them.

`app` is what Envoy runs (`EnvoyServer(settings, app="tests.interop_app:app")`): the same
launcher, the same lifespan protocol (settings file in, state file out, log lines to the
launcher's stderr) and the same codec (`GrpcCodec` over a `HandlerTable`) as our server's
own application, with the interop service in the table instead of ours.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from moduleserve.server.frontends.envoy import LOG_FD_ENV, SETTINGS_ENV, STATE_ENV
from moduleserve.server.frontends.grpc_codec import GrpcCodec, HandlerTable, is_grpc

SERVICE = "grpc.testing.TestService"
ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"

_F = descriptor_pb2.FieldDescriptorProto
# (message, [(field, number, type, label, message type)])
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    ("Empty", []),
    ("Payload", [("type", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
                 ("body", 2, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, "")]),
    ("EchoStatus", [("code", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
                    ("message", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, "")]),
    ("SimpleRequest", [("response_type", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
                       ("response_size", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
                       ("payload", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "Payload"),
                       ("response_status", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "EchoStatus")]),
    ("SimpleResponse", [("payload", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "Payload")]),
    ("StreamingInputCallRequest",
     [("payload", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "Payload")]),
    ("StreamingInputCallResponse",
     [("aggregated_payload_size", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, "")]),
    ("ResponseParameters", [("size", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
                            ("interval_us", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, "")]),
    ("StreamingOutputCallRequest",
     [("response_type", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
      ("response_parameters", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "ResponseParameters"),
      ("payload", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "Payload"),
      ("response_status", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "EchoStatus")]),
    ("StreamingOutputCallResponse", [("payload", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL,
                                      "Payload")]),
]  # fmt: skip


def _build() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="grpc/testing/interop_subset.proto", package="grpc.testing", syntax="proto3"
    )
    for name, fields in _MESSAGES:
        message = file.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            added = message.field.add(name=field, number=number, type=kind, label=label)  # type: ignore[arg-type]
            if type_name:
                added.type_name = f".grpc.testing.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.testing.{name}"))
        for name, _ in _MESSAGES
    }


MESSAGES = _build()
Empty = MESSAGES["Empty"]
Payload = MESSAGES["Payload"]
EchoStatus = MESSAGES["EchoStatus"]
SimpleRequest = MESSAGES["SimpleRequest"]
SimpleResponse = MESSAGES["SimpleResponse"]
StreamingInputCallRequest = MESSAGES["StreamingInputCallRequest"]
StreamingInputCallResponse = MESSAGES["StreamingInputCallResponse"]
ResponseParameters = MESSAGES["ResponseParameters"]
StreamingOutputCallRequest = MESSAGES["StreamingOutputCallRequest"]
StreamingOutputCallResponse = MESSAGES["StreamingOutputCallResponse"]

# method -> (request type, response type, request streaming, response streaming)
METHODS: dict[str, tuple[Any, Any, bool, bool]] = {
    "EmptyCall": (Empty, Empty, False, False),
    "UnaryCall": (SimpleRequest, SimpleResponse, False, False),
    "StreamingOutputCall": (StreamingOutputCallRequest, StreamingOutputCallResponse, False, True),
    "StreamingInputCall": (StreamingInputCallRequest, StreamingInputCallResponse, True, False),
    "FullDuplexCall": (StreamingOutputCallRequest, StreamingOutputCallResponse, True, True),
    # UnimplementedCall is in the service, not in any server: UNIMPLEMENTED.
}


def _status(code: int) -> grpc.StatusCode:
    return next(status for status in grpc.StatusCode if status.value[0] == code)


class InteropService:
    """The interop server's behaviour (interop-test-descriptions.md, "Server")."""

    async def _echo_metadata(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        if ECHO_INITIAL in metadata:
            await context.send_initial_metadata([(ECHO_INITIAL, metadata[ECHO_INITIAL])])
        if ECHO_TRAILING in metadata:
            context.set_trailing_metadata([(ECHO_TRAILING, metadata[ECHO_TRAILING])])

    async def _check_status(self, request: Any, context: Any) -> None:
        if request.HasField("response_status") and request.response_status.code:
            status = request.response_status
            await context.abort(_status(status.code), status.message)

    async def EmptyCall(self, request: Any, context: Any) -> Any:
        return Empty()

    async def UnaryCall(self, request: Any, context: Any) -> Any:
        await self._echo_metadata(context)
        await self._check_status(request, context)
        return SimpleResponse(payload=Payload(body=bytes(request.response_size)))

    async def StreamingOutputCall(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self._check_status(request, context)
        for params in request.response_parameters:
            await asyncio.sleep(params.interval_us / 1e6)
            yield StreamingOutputCallResponse(payload=Payload(body=bytes(params.size)))

    async def StreamingInputCall(self, requests: AsyncIterator[Any], context: Any) -> Any:
        size = 0
        async for request in requests:
            size += len(request.payload.body)
        return StreamingInputCallResponse(aggregated_payload_size=size)

    async def FullDuplexCall(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        await self._echo_metadata(context)
        async for request in requests:
            await self._check_status(request, context)
            for params in request.response_parameters:
                await asyncio.sleep(params.interval_us / 1e6)
                yield StreamingOutputCallResponse(payload=Payload(body=bytes(params.size)))

    def generic_handler(self) -> grpc.GenericRpcHandler:
        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        handlers = {
            name: kinds[(request_streaming, response_streaming)](
                getattr(self, name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (request, response, request_streaming, response_streaming) in METHODS.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


class InteropApplication:
    """The ASGI application Envoy runs for the interop tests."""

    def __init__(self) -> None:
        self._codec: GrpcCodec | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http" and self._codec is not None and is_grpc(scope):
            await self._codec(scope, receive, send)
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _start(self) -> None:
        from moduleserve.server.config import ServerSettings
        from moduleserve.server.logs import configure_logging

        settings_file = Path(os.environ[SETTINGS_ENV])
        settings = ServerSettings.model_validate_json(settings_file.read_text())
        settings_file.unlink(missing_ok=True)
        stream = os.fdopen(int(os.environ[LOG_FD_ENV]), "w", buffering=1)
        configure_logging(settings.log_level, settings.log_format, stream)
        table = HandlerTable()
        table.add_generic_rpc_handlers([InteropService().generic_handler()])
        self._codec = GrpcCodec(table, settings.max_message_mb * 1024 * 1024)
        state = Path(os.environ[STATE_ENV])
        state.with_suffix(".tmp").write_text(json.dumps({}))
        state.with_suffix(".tmp").replace(state)


app = InteropApplication()
