"""The references the server is measured against: the gRPC echo floor and in-process torch."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.models import BenchModel
from bench.processes import machine_busy_s, started


def echo_response(model: BenchModel, output_name: str, output_shape: list[int]) -> bytes:
    """A serialized ModelInferResponse like the server's: one FP32 output in raw contents."""
    from moduleserve.client.pb import oip_v2_pb2 as pb

    shape = [1, *output_shape[1:]]
    elements = 1
    for dim in shape:
        elements *= dim
    tensor = pb.ModelInferResponse.InferOutputTensor(name=output_name, datatype="FP32", shape=shape)
    response = pb.ModelInferResponse(
        model_name=model.name,
        model_version="1",
        outputs=[tensor],
        raw_output_contents=[bytes(4 * elements)],
    )
    return response.SerializeToString()


ECHO_MODULES = {"grpc": "bench.echo_server", "envoy": "bench.pyvoy_echo"}


@contextmanager
def echo_running(
    tmp: Path, model: BenchModel, response: bytes, kind: str, cpus: set[int]
) -> Iterator[tuple[int, int]]:
    """Start an echo floor answering ``response`` on ``cpus``; yield (pid, port). ``kind``:
    ``grpc`` (grpc.aio, ``bench/echo_server.py``) or ``envoy`` (an ASGI app under pyvoy,
    ``bench/pyvoy_echo.py``)."""
    response_file = tmp / f"{model.name}.response"
    response_file.write_bytes(response)
    port_file = tmp / f"echo-{kind}.port"
    cmd = [
        sys.executable,
        "-m",
        ECHO_MODULES[kind],
        f"--response-file={response_file}",
        f"--port-file={port_file}",
    ]
    with started(cmd, port_file, tmp / f"echo-{kind}.log", cpus=cpus) as (pid, port, _):
        yield pid, port


def inprocess(
    module: Any, model: BenchModel, max_batch: int, seconds: float, threads: int
) -> dict[str, Any]:
    """Samples/s of ``module`` called in this process on ``threads`` torch threads: one sample
    at a time, and in batches of ``max_batch``."""
    import torch

    def rate(x: torch.Tensor) -> tuple[float, float]:
        for _ in range(20):
            module(x)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            module(x)
            calls += 1
        return calls * x.shape[0] / elapsed, 1e3 * elapsed / calls

    module.eval()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    try:
        with torch.inference_mode():
            single, single_ms = rate(torch.randn(model.sample_shape))
            batched, batch_ms = rate(torch.randn([max_batch, *model.sample_shape[1:]]))
    finally:
        torch.set_num_threads(default_threads)
    other_s = (machine_busy_s() - busy0) - (time.process_time() - own0)
    return {
        "threads": threads,
        "single_samples_per_s": single,
        "single_ms_per_call": single_ms,
        "batch_size": max_batch,
        "batch_samples_per_s": batched,
        "batch_ms_per_call": batch_ms,
        "other_cpu_pct": max(0.0, 100.0 * other_s / (time.perf_counter() - wall0)),
    }


def run_inprocess(
    built: dict[str, Any], models: list[BenchModel], args: argparse.Namespace
) -> dict[str, list[dict[str, Any]]]:
    """Reference (b) for every model, on torch's default thread count and on one thread."""
    import torch

    counts = sorted({torch.get_num_threads(), 1}, reverse=True)
    out: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        for threads in counts:
            ref = inprocess(
                built[model.name][2], model, args.max_batch_size, args.inprocess_seconds, threads
            )
            out.setdefault(model.name, []).append(ref)
            print(f"in-process {model.name:<6} {threads} thread(s): "
                  f"{ref['single_samples_per_s']:>7.0f} samples/s one at a time "
                  f"({ref['single_ms_per_call']:.3f} ms/call), "
                  f"{ref['batch_samples_per_s']:>7.0f} samples/s in batches of "
                  f"{ref['batch_size']} ({ref['batch_ms_per_call']:.2f} ms/call), "
                  f"other jobs {ref['other_cpu_pct']:.0f}%")  # fmt: skip
    return out
