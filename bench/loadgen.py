"""The load generator: N closed-loop ModelInfer callers over grpc.aio, in a process of its own.

Started by ``bench.serve`` as ``python -m bench.loadgen --target HOST:PORT --request-file F
--concurrency N``. Each caller sends the same pre-serialized request; after the warm-up it
prints ``START``, measures ``--duration`` seconds, prints ``END``, then one JSON line with
req/s, latency percentiles and its own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class _Window:
    """What the closed-loop workers share: the phase flags and the measured latencies."""

    recording: bool = False
    stopping: bool = False
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""


async def _worker(call: grpc.aio.UnaryUnaryMultiCallable, request: bytes, w: _Window) -> None:
    while not w.stopping:
        start = time.perf_counter_ns()
        try:
            await call(request, timeout=30.0)
        except grpc.aio.AioRpcError as err:
            if w.recording:
                w.errors += 1
                w.first_error = w.first_error or f"{err.code().name}: {err.details()}"
            continue
        if w.recording:
            w.latencies_ns.append(time.perf_counter_ns() - start)


def _percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


async def drive(
    target: str, request: bytes, concurrency: int, channels: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """Run ``concurrency`` closed-loop callers; print START/END around the measured window."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in chans)), 30.0)
    calls = [c.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
             for c in chans]  # fmt: skip
    window = _Window()
    tasks = [
        asyncio.create_task(_worker(calls[i % channels], request, window))
        for i in range(concurrency)
    ]
    await asyncio.sleep(warmup_s)
    print("START", flush=True)
    start_ns, cpu_start = time.perf_counter_ns(), time.process_time()
    window.recording = True
    await asyncio.sleep(duration_s)
    window.recording = False
    elapsed_s = (time.perf_counter_ns() - start_ns) / 1e9
    cpu_s = time.process_time() - cpu_start
    print("END", flush=True)
    window.stopping = True
    await asyncio.gather(*tasks)
    await asyncio.gather(*(c.close() for c in chans))
    lat = sorted(window.latencies_ns)
    return {
        "concurrency": concurrency,
        "channels": channels,
        "seconds": elapsed_s,
        "requests": len(lat),
        "errors": window.errors,
        "first_error": window.first_error,
        "rps": len(lat) / elapsed_s,
        "p50_ms": _percentile(lat, 0.50) / 1e6,
        "p90_ms": _percentile(lat, 0.90) / 1e6,
        "p99_ms": _percentile(lat, 0.99) / 1e6,
        "mean_ms": sum(lat) / len(lat) / 1e6 if lat else 0.0,
        "max_ms": lat[-1] / 1e6 if lat else 0.0,
        "client_cpu_pct": 100.0 * cpu_s / elapsed_s,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the load-generator process: the result goes to stdout as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--target", required=True)
    parser.add_argument("--request-file", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    request = args.request_file.read_bytes()
    result = asyncio.run(
        drive(args.target, request, args.concurrency, args.channels, args.warmup, args.duration)
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
