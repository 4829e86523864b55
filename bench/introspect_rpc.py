"""Benchmark the Introspection RPCs on a ~100M-parameter model: latency and the server's peak RSS.

Run from the repository root: ``.venv/bin/python -m bench.introspect_rpc``. A registry on
SQLite in a temporary folder gets ``tests.models:Wide`` (4 x Linear(5000, 5000), 100M
float32 parameters, 400 MB) in two versions; a server runs as a child process (this module
with ``--serve``) and is sampled with psutil while each call runs, first with the model
unloaded (built from the registry per call, never cached) and then loaded. Prints a table
and writes ``bench/results/introspect_rpc.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.introspect import PeakRss
from moduleserve.client.client import ModelClient
from moduleserve.client.introspection import IntrospectionClient

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "introspect_rpc.json"
MIB = 1 << 20
PREFIXES = ["tests.models"]


def measure(pid: int, fn: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Time ``fn`` ``repeats`` times while sampling the server's RSS."""
    times, increases, peaks = [], [], []
    for _ in range(repeats):
        with PeakRss(pid) as rss:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        increases.append((rss.peak - rss.baseline) / MIB)
        peaks.append(rss.peak / MIB)
    return {
        "seconds": times,
        "seconds_min": min(times),
        "seconds_median": statistics.median(times),
        "server_peak_rss_increase_mib": max(increases),
        "server_peak_rss_mib": max(peaks),
    }


def seed(db: str, store: Path, features: int, layers: int) -> dict[str, Any]:
    """Register Wide and push two versions (the second with its first layer changed)."""
    from moduleserve.registry.api import Registry
    from moduleserve.registry.classes import parse_input_spec
    from moduleserve.registry.config import RegistrySettings
    from tests.models import Wide

    registry = Registry(RegistrySettings(db=db, store=store, allowed_class_prefixes=PREFIXES))
    registry.init()
    kwargs = {"features": features, "layers": layers}
    spec = parse_input_spec(f"x:float32:-1,{features}")
    registry.classes.register("wide", "tests.models:Wide", kwargs, [spec])
    torch.manual_seed(0)
    model = Wide(features, layers)
    started = time.perf_counter()
    first = registry.push("wide", model.state_dict(), class_name="wide")
    push_s = time.perf_counter() - started
    with torch.no_grad():
        model.layers[0].weight.mul_(1.01)
    registry.push("wide", model.state_dict(), parent=first.version)
    parameters = sum(p.numel() for p in model.parameters())
    registry.close()
    del model
    gc.collect()
    return {"parameters": parameters, "checkpoint_bytes": first.size, "push_seconds": push_s}


def serve(db: str, store: Path, port_file: Path) -> int:
    """Child process: an App with the Introspection service, until SIGTERM."""
    from moduleserve.client.pb import moduleserve_v1_pb2_grpc as pb_grpc
    from moduleserve.server.app import App
    from moduleserve.server.config import ServerSettings
    from moduleserve.server.servicers.introspection import IntrospectionServicer

    settings = ServerSettings(
        db=db, store=store, grpc_port=0, metrics_port=None, allowed_class_prefixes=PREFIXES
    )

    async def run() -> None:
        app = App(settings)
        # Harmless once App registers the service itself: the later registration wins.
        servicer = IntrospectionServicer(app.registry, app.cache)
        pb_grpc.add_IntrospectionServicer_to_server(servicer, app.server)
        port = await app.start()
        port_file.write_text(str(port))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await app.stop(0)

    asyncio.run(run())
    return 0


def start_server(db: str, store: Path, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the child server and wait for its port."""
    port_file = folder / "port"
    cmd = [
        sys.executable,
        "-m",
        "bench.introspect_rpc",
        "--serve",
        "--db",
        db,
        "--store",
        str(store),
    ]
    child = subprocess.Popen(
        [*cmd, "--port-file", str(port_file)], stderr=subprocess.DEVNULL, cwd=ROOT
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return child, int(port_file.read_text())


def run_calls(pid: int, port: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Every view, unloaded then loaded, timed with the server's RSS sampled."""
    runs: dict[str, dict[str, Any]] = {}
    with ModelClient(f"127.0.0.1:{port}", timeout=600) as client:
        inspect = IntrospectionClient(client.channel, timeout=600)
        calls: list[tuple[str, Callable[[], object]]] = [
            ("GetModuleTree", lambda: inspect.tree("wide")),
            ("ListTensors all stats", lambda: inspect.tensors("wide")),
            ("ListTensors one glob", lambda: inspect.tensors("wide", pattern="layers.0.bias")),
            (
                "GetTensor 8x5000 slice",
                lambda: inspect.tensor("wide", "layers.0.weight", "", "0:8"),
            ),
            ("DiffVersions 1 vs 2", lambda: inspect.diff("wide", "1", "2")),
        ]
        for name, call in calls:
            runs[f"{name} (unloaded)"] = measure(pid, call, repeats)
        runs["RepositoryModelLoad"] = measure(pid, lambda: client.load("wide"), 1)
        for name, call in calls[:4]:
            runs[f"{name} (loaded)"] = measure(pid, call, repeats)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Seed, start the server, time every view, print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.db, args.store, args.port_file)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db, store = f"sqlite:///{folder / 'registry.db'}", folder / "store"
        model = seed(db, store, args.features, args.layers)
        child, port = start_server(db, store, folder)
        try:
            idle_mib = psutil.Process(child.pid).memory_info().rss / MIB
            runs = run_calls(child.pid, port, args.repeats)
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=60)

    print(f"model: Wide({args.features}, {args.layers}) {model['parameters']:,} float32 params")
    print(
        f"checkpoint {model['checkpoint_bytes'] / MIB:,.0f} MiB; server idle RSS {idle_mib:.0f} MiB"
    )
    print(f"torch {torch.__version__}, {psutil.cpu_count()} CPUs, {args.repeats} repeats")
    header = ("call", "min s", "median s", "server RSS +MiB", "peak MiB")
    print("{:<38} {:>7} {:>9} {:>16} {:>9}".format(*header))
    for name, run in runs.items():
        print(
            f"{name:<38} {run['seconds_min']:>7.2f} {run['seconds_median']:>9.2f} "
            f"{run['server_peak_rss_increase_mib']:>16.0f} {run['server_peak_rss_mib']:>9.0f}"
        )
    report = {
        "model": {"features": args.features, "layers": args.layers, **model},
        "server_idle_rss_mib": idle_mib,
        "torch": torch.__version__,
        "cpu_count": psutil.cpu_count(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
