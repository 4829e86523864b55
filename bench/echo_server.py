"""The echo floor: a grpc.aio server that answers ModelInfer with fixed bytes and does no work.

Started by ``bench.serve`` as a subprocess: ``python -m bench.echo_server --response-file F
--port-file P``. The handler takes the raw request bytes (no deserializer) and returns a
pre-serialized ModelInferResponse, so what it costs is Python gRPC's own per-call overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVICE = "inference.GRPCInferenceService"


def grpc_options() -> list[tuple[str, int]]:
    """The options of the real server (``server/app.py``) with its default ``max_message_mb``."""
    from moduleserve.server.config import ServerSettings

    max_bytes = min(ServerSettings.model_fields["max_message_mb"].default << 20, 2**31 - 1)
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.so_reuseport", 1),
    ]


def echo_handler(response: bytes) -> grpc.GenericRpcHandler:
    """A generic handler whose ModelInfer returns ``response`` for any request."""

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    handler = grpc.unary_unary_rpc_method_handler(
        model_infer, request_deserializer=None, response_serializer=None
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler})


async def serve(response: bytes, host: str, port_file: Path) -> None:
    """Serve until SIGTERM or SIGINT, writing the bound port to ``port_file`` once listening."""
    server = grpc.aio.server(options=grpc_options())
    server.add_generic_rpc_handlers((echo_handler(response),))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    temp = port_file.with_suffix(".tmp")
    temp.write_text(str(port))
    temp.replace(port_file)  # atomic: the parent never reads a half-written port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--response-file", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.response_file.read_bytes(), args.host, args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
