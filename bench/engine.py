"""What the engine costs per request without gRPC, and what its thread handoff costs.

Run from the repository root: ``.venv/bin/python -m bench.engine``. It builds the same
throwaway registry as ``bench.serve`` (``bench/models.py``) and, in this one process,
drives the real ``InferenceServicer.ModelInfer`` (request decoding, the model cache, the
dynamic batcher, the compute thread, response encoding) with N closed-loop coroutines; no
network, no gRPC.

Each model runs once per maximum batch size, concurrency and ``--compute`` setting
(``thread,inline,auto`` by default; the server's setting of that name):
- ``thread``: forward passes on the device's compute thread;
- ``inline``: forward passes on the event loop; the gap between the two rows is what handing
  each batch to another thread and back costs on this machine (wake-ups and GIL handoffs);
- ``auto``: what the server picks at load (the ``mode`` column) from the timed forward pass.

Columns: req/s, process CPU per request, voluntary context switches per request (all
threads), mean rows per forward pass, and where the model computed. Pin the process to
one core (``taskset -c 0``) and pass ``--torch-threads 1`` to measure the one-core case.

A second table times one single-sample forward pass after the thread slept for a gap
(0 to 5 ms), in this process: the gap a lone request (N=1) leaves between passes. Writes
``bench/results/engine.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.models import MODELS, build_registry, infer_request
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.classes import build_module, import_class
from moduleserve.server.app import App
from moduleserve.server.config import ServerSettings

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "engine.json"


class _Context:
    """The one ServicerContext method ModelInfer reads on success."""

    def time_remaining(self) -> float | None:
        return None


def voluntary_switches() -> int:
    """Voluntary context switches of every thread of this process so far."""
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split(":")[1])
    return total


async def drive(app: App, request: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    """N closed-loop callers of ModelInfer for `seconds` after a 0.5 s warm-up."""
    servicer, context = app.inference, _Context()
    parse, stop, done = pb.ModelInferRequest.FromString, False, 0

    async def caller() -> None:
        nonlocal done
        while not stop:
            response = await servicer.ModelInfer(parse(request), context)  # type: ignore[arg-type]
            response.SerializeToString()
            done += 1

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)
    batcher = app.cache.loaded()[0].batcher

    def snapshot() -> tuple[int, float, float, int, int, int]:
        stats = batcher.stats()
        cpu, wall = time.process_time(), time.perf_counter()
        return done, cpu, wall, voluntary_switches(), stats.rows, stats.batches

    before = snapshot()
    await asyncio.sleep(seconds)
    after = snapshot()
    stop = True
    await asyncio.gather(*tasks)
    deltas = (a - b for a, b in zip(after, before, strict=True))
    requests, cpu, wall, switches, rows, batches = deltas
    return {
        "requests": requests,
        "rps": requests / wall,
        "cpu_us_per_request": 1e6 * cpu / requests,
        "switches_per_request": switches / requests,
        "mean_batch": rows / batches if batches else 0.0,
    }


async def measure(
    tmp: Path, model: str, max_batch: int, compute: str, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: a fresh App over the registry, the model loaded, then the closed loop."""
    settings = ServerSettings(
        db=f"sqlite:///{tmp}/registry.db",
        store=tmp / "store",
        allowed_class_prefixes=["moduleserve.registry.demo"],
        metrics_port=None,
        batching={"max_batch_size": max_batch, "max_queue_delay_ms": args.max_queue_delay_ms},
        compute=compute,
        torch_threads=args.torch_threads,
    )
    app = App(settings)
    app.cache.start()
    try:
        loaded = await app.cache.load(model)
        request = infer_request(MODELS[model])
        row = await drive(app, request, concurrency, args.duration)
    finally:
        await app.cache.close()
        app.executors.shutdown()
        app.registry.close()
    return {
        "model": model,
        "max_batch": max_batch,
        "concurrency": concurrency,
        "compute": compute,
        "mode": loaded.compute,
        "forward_ms": loaded.forward_ms,
        **row,
    }


def forward_after_gap(model: str, gaps_ms: list[float], repeats: int = 200) -> dict[str, float]:
    """Median single-sample forward time (us) after sleeping each gap, on one thread."""
    spec = MODELS[model]
    cls = import_class(spec.import_path, ["moduleserve.registry.demo"])
    module = build_module(cls, spec.kwargs).eval()
    x = torch.randn(spec.sample_shape)
    medians = {}
    with torch.inference_mode():
        for _ in range(20):
            module(x)
        for gap in gaps_ms:
            times = []
            for _ in range(repeats):
                if gap:
                    time.sleep(gap / 1000)
                start = time.perf_counter_ns()
                module(x)
                times.append(time.perf_counter_ns() - start)
            medians[f"{gap:g}"] = sorted(times)[len(times) // 2] / 1000
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per row")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated callers")
    parser.add_argument("--compute", default="thread,inline,auto", help="comma-separated")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="intra-op threads (default: the server's, half the cores)",
    )
    parser.add_argument("--models", default="mynet,mlp")
    parser.add_argument("--max-batch", default="32", help="comma-separated sizes")
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    sizes = [int(s) for s in args.max_batch.split(",")]
    callers = [int(n) for n in args.concurrency.split(",")]
    computes = args.compute.split(",")
    torch.set_num_threads(args.torch_threads)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs ({cpus} usable), python "
          f"{platform.python_version()}, torch {torch.__version__}, "
          f"torch threads {args.torch_threads}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp_name:
        tmp = Path(tmp_name)
        build_registry(tmp, [MODELS[m] for m in models])
        print(f"{'model':6} {'max':>4} {'N':>3} {'compute':7} {'mode':6} {'req/s':>8} "
              f"{'CPU us/req':>10} {'switches/req':>12} {'batch':>6}")  # fmt: skip
        for model in models:
            for size in sizes:
                for n in callers:
                    for compute in computes:
                        row = asyncio.run(measure(tmp, model, size, compute, n, args))
                        rows.append(row)
                        print(f"{model:6} {size:4d} {n:3d} {compute:7} {row['mode']:6} "
                              f"{row['rps']:8.0f} {row['cpu_us_per_request']:10.1f} "
                              f"{row['switches_per_request']:12.2f} "
                              f"{row['mean_batch']:6.1f}", flush=True)  # fmt: skip
    gaps = [0.0, 0.5, 2.0, 5.0]
    print("single-sample forward after an idle gap (median us, one thread):")
    print(f"{'model':6} " + " ".join(f"{f'{g:g} ms':>8}" for g in gaps))
    after_gap = {}
    for model in models:
        after_gap[model] = forward_after_gap(model, gaps)
        print(f"{model:6} " + " ".join(f"{v:8.0f}" for v in after_gap[model].values()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "argv": sys.argv,
        "torch_threads": args.torch_threads,
        "usable_cpus": cpus,
        "rows": rows,
        "forward_after_gap_us": after_gap,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
