"""What a gRPC codec costs per call under Envoy: ours, connect-python's, and the bare floor.

Run from the repository root: ``.venv/bin/python -m bench.codecs``. Each codec serves
``/inference.GRPCInferenceService/ModelInfer`` from an ASGI app under pyvoy (Envoy), pinned
to CPU 0, and answers every call by parsing the request and returning the same prebuilt
``ModelInferResponse`` (no model, no engine), driven by h2load on CPU 1 with a prebuilt
MyNet-sized request body:

- ``bare``: hand-written framing and trailers, nothing else (what any codec must pay);
- ``ours``: ``server/frontends/grpc_codec.py`` running a grpc unary handler, as the server
  does (handler lookup, deadline, context, the three-send reply);
- ``connect``: connect-python's ``ConnectASGIApplication`` with one unary endpoint.

Prints req/s and the server's CPU per call, writes ``bench/results/codecs.json``. Needs
h2load (``apt-get install nghttp2-client``) and connect-python (a dev dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from moduleserve.client.pb import oip_v2_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "codecs.json"
PATH = "/inference.GRPCInferenceService/ModelInfer"
CODECS = ("bare", "ours", "connect")


def request_body() -> bytes:
    """A framed single-sample MyNet request, as a client sends it."""
    request = pb.ModelInferRequest(model_name="mynet")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 3, 8, 8), np.float32).tobytes())
    data = request.SerializeToString()
    return struct.pack(">?I", False, len(data)) + data


def response() -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name="mynet", model_version="1")
    out.outputs.add(name="output0", datatype="FP32", shape=[1, 10])
    out.raw_output_contents.append(bytes(40))
    return out


# -- the three apps (imported by Envoy's Python: `bench.codecs:<name>_app`) ---------------

_REPLY = response()


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    pb.ModelInferRequest.FromString(body[5:])
    data = _REPLY.SerializeToString()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/grpc")],
            "trailers": True,
        }
    )
    await send({"type": "http.response.body", "body": struct.pack(">?I", False, len(data)) + data})
    await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})


def _ours() -> Any:
    import grpc

    from moduleserve.server.frontends.grpc_codec import GrpcCodec, HandlerTable

    async def infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return _REPLY

    handler = grpc.unary_unary_rpc_method_handler(
        infer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    table = HandlerTable()
    table.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": handler}
            )
        ]
    )
    return GrpcCodec(table, 64 * 2**20)


def _connect() -> Any:
    from connectrpc.method import IdempotencyLevel, MethodInfo
    from connectrpc.server import ConnectASGIApplication, Endpoint

    method = MethodInfo(
        name="ModelInfer",
        service_name="inference.GRPCInferenceService",
        input=pb.ModelInferRequest,
        output=pb.ModelInferResponse,
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )

    async def infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return _REPLY

    class App(ConnectASGIApplication[object]):
        @property
        def path(self) -> str:
            return "/inference.GRPCInferenceService"

    return App(service=object(), endpoints=lambda _: {PATH: Endpoint.unary(method, infer)})


def __getattr__(name: str) -> Any:  # the apps are built when Envoy imports them
    if name == "ours_app":
        return _ours()
    if name == "connect_app":
        return _connect()
    raise AttributeError(name)


# -- the measurement ----------------------------------------------------------------------


def run_one(codec: str, body: Path, requests: int, port: int) -> dict[str, Any]:
    cpus = ("0", "1") if (os.cpu_count() or 1) >= 2 else ("0", "0")
    pyvoy = Path(sys.executable).with_name("pyvoy")
    server = subprocess.Popen(
        ["taskset", "-c", cpus[0], str(pyvoy), f"bench.codecs:{codec}_app", "--port", str(port)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        h2load = [
            *("taskset", "-c", cpus[1], "h2load", "-c", "4", "-m", "16", "-d", str(body)),
            *("-H", "content-type: application/grpc", "-H", "te: trailers"),
            f"http://127.0.0.1:{port}{PATH}",
        ]
        deadline = time.monotonic() + 60
        while True:  # up and answering
            out = subprocess.run([*h2load, "-n", "200"], capture_output=True, text=True).stdout
            if " 200 succeeded" in out or "200 succeeded" in out:
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{codec}: the server did not answer")
            time.sleep(0.5)
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in tree)

        cpu0, t0 = cpu(), time.monotonic()
        out = subprocess.run([*h2load, "-n", str(requests)], capture_output=True, text=True).stdout
        cpu1, t1 = cpu(), time.monotonic()
        succeeded = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
        return {
            "codec": codec,
            "requests": requests,
            "succeeded": succeeded,
            "req_per_s": succeeded / (t1 - t0),
            "server_cpu_us_per_call": 1e6 * (cpu1 - cpu0) / max(succeeded, 1),
            "server_cpu": (cpu1 - cpu0) / (t1 - t0),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=18790)
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(request_body())
        print("codec     req/s  server CPU  us/call")
        for _ in range(args.repeats):  # interleaved, so that machine noise hits each alike
            for codec in CODECS:
                row = run_one(codec, body, args.requests, args.port)
                rows.append(row)
                print(
                    f"{codec:8} {row['req_per_s']:6.0f}  {row['server_cpu']:10.2f}  "
                    f"{row['server_cpu_us_per_call']:7.1f}",
                    flush=True,
                )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
