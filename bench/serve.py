"""Benchmark the inference server against the Python gRPC echo floor and in-process torch.

Run from the repository root: ``.venv/bin/python bench/serve.py``. For each model it measures
(b) in-process samples/s (one sample at a time and in batches of the maximum batch size),
(a) the echo floor (``bench/echo_server.py``: a grpc.aio server answering a same-sized response
without doing any work) and the real ``moduleserve-server``, each driven by N concurrent
closed-loop single-sample ModelInfer calls from a separate load-generator process. Prints one
table and the target checks, and writes ``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

RESULTS = ROOT / "bench" / "results" / "serve.json"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STATISTICS = "/inference.GRPCInferenceService/ModelStatistics"
MIB = 1 << 20


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked model: its registered class and its single input."""

    name: str
    class_name: str
    import_path: str
    kwargs: dict[str, Any]
    input_spec: str  # name:dtype:shape with -1 for the batch dimension

    @property
    def sample_shape(self) -> list[int]:
        """The input shape of one sample, batch dimension 1."""
        return [1, *(int(d) for d in self.input_spec.split(":")[2].split(",")[1:])]


MODELS = {
    "mynet": BenchModel(
        "mynet", "MyNet", "moduleserve.registry.demo.models:MyNet", {}, "x:float32:-1,3,8,8"
    ),
    "mlp": BenchModel(
        "mlp",
        "MLPBig",
        "moduleserve.registry.demo.models:MLP",
        {"in_features": 784, "hidden": [1024, 1024], "out_features": 10, "dropout": 0.1},
        "x:float32:-1,784",
    ),
}


# -- load generator (its own process: ``serve.py loadgen ...``) ------------------------------


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


def loadgen_main(argv: list[str]) -> int:
    """Entry point of the load-generator process: the result goes to stdout as one JSON line."""
    parser = argparse.ArgumentParser(prog="serve.py loadgen")
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


# -- the parent: processes, statistics, payloads ----------------------------------------------


class ProcessGroup:
    """A server process and its children, for CPU (% of one core) and RSS over a window."""

    def __init__(self, pid: int) -> None:
        root = psutil.Process(pid)
        self.processes = [root, *root.children(recursive=True)]
        self._cpu0 = self._wall0 = 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the group so far."""
        total = 0.0
        for proc in self.processes:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def rss_mib(self) -> float:
        """Resident memory of the group now."""
        total = 0
        for proc in self.processes:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / MIB

    def start(self) -> None:
        """Begin a CPU window."""
        self._cpu0, self._wall0 = self.cpu_seconds(), time.perf_counter()

    def cpu_pct(self) -> float:
        """CPU since `start`, in % of one core."""
        return 100.0 * (self.cpu_seconds() - self._cpu0) / (time.perf_counter() - self._wall0)


def machine_busy_s() -> float:
    """CPU seconds all cores spent running anything since boot (guest time is inside user)."""
    times = psutil.cpu_times()
    return sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def wait_quiet(max_wait_s: float, busy_pct: float = 25.0, window_s: float = 2.0) -> float:
    """Wait (up to ``max_wait_s``) until the machine is under ``busy_pct`` for ``window_s``;
    return the last measured busy percentage (of one core)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        start = machine_busy_s()
        time.sleep(window_s)
        busy = 100.0 * (machine_busy_s() - start) / window_s
        if busy < busy_pct or time.monotonic() >= deadline:
            return busy


class Statistics:
    """Rows and forward passes of one model so far, from ModelStatistics (None when it fails)."""

    def __init__(self, target: str) -> None:
        from moduleserve.client.pb import oip_v2_pb2 as pb

        self._pb = pb
        self._channel = grpc.insecure_channel(target)
        self._call = self._channel.unary_unary(
            MODEL_STATISTICS,
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )

    def rows_and_batches(self, model: str) -> tuple[int, int] | None:
        """Rows inferred and forward passes run so far, from batch_stats."""
        try:
            response = self._call(self._pb.ModelStatisticsRequest(name=model), timeout=10.0)
        except grpc.RpcError:
            return None
        if not response.model_stats:
            return None
        stats = response.model_stats[0]
        if stats.batch_stats:
            rows = sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats)
            return rows, sum(b.compute_infer.count for b in stats.batch_stats)
        return stats.inference_count, stats.execution_count

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def mean_batch(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Rows per forward pass between two statistics snapshots."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def run_load(
    target: str,
    request_file: Path,
    concurrency: int,
    args: argparse.Namespace,
    group: ProcessGroup,
    stats: Callable[[], tuple[int, int] | None] | None,
) -> dict[str, Any]:
    """One N-run: spawn the load generator, sample the server over its measured window."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "loadgen",
        f"--target={target}",
        f"--request-file={request_file}",
        f"--concurrency={concurrency}",
        f"--channels={args.channels}",
        f"--warmup={args.warmup}",
        f"--duration={args.duration}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    if proc.stdout.readline().strip() != "START":
        raise RuntimeError(f"load generator failed:\n{proc.communicate()[1]}")
    group.start()
    busy0, own0 = machine_busy_s(), time.process_time()
    before = stats() if stats else None
    if proc.stdout.readline().strip() != "END":
        raise RuntimeError(f"load generator failed:\n{proc.communicate()[1]}")
    cpu_pct, rss_mib = group.cpu_pct(), group.rss_mib()
    busy_s, own_s = machine_busy_s() - busy0, time.process_time() - own0
    after = stats() if stats else None
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator exited {proc.returncode}:\n{err}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result.update(server_cpu_pct=cpu_pct, server_rss_mib=rss_mib)
    # Everything else the machine did meanwhile (other users' jobs skew the numbers).
    machine_pct = 100.0 * busy_s / result["seconds"]
    own_pct = 100.0 * own_s / result["seconds"]
    result["machine_cpu_pct"] = machine_pct
    result["server_cpu_us_per_request"] = 1e4 * cpu_pct / result["rps"] if result["rps"] else 0.0
    result["other_cpu_pct"] = max(0.0, machine_pct - cpu_pct - result["client_cpu_pct"] - own_pct)
    result["mean_batch"] = mean_batch(before, after)
    return result


def infer_request(model: BenchModel) -> bytes:
    """One serialized single-sample ModelInferRequest with random float32 input."""
    import numpy as np

    from moduleserve.client.pb import oip_v2_pb2 as pb

    name = model.input_spec.split(":")[0]
    data = np.random.default_rng(0).standard_normal(model.sample_shape, dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=name, datatype="FP32", shape=model.sample_shape
    )
    request = pb.ModelInferRequest(
        model_name=model.name, inputs=[tensor], raw_input_contents=[data.tobytes()]
    )
    return request.SerializeToString()


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


def wait_for_port(port_file: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The port the process wrote, or None when it exited or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def started(
    cmd: list[str], port_file: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[int, int, float]]:
    """Run ``cmd`` with output to ``log_path``; yield (pid, port, start-up seconds)."""
    port_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        try:
            port = wait_for_port(port_file, proc, 60.0)
            if port is None:
                raise ServerStartError(f"{shlex.join(cmd)}\nfailed to start:\n{log_tail(log_path)}")
            yield proc.pid, port, time.perf_counter() - start
        finally:
            stop_process(proc)


class ServerStartError(RuntimeError):
    """A server process exited or did not write its port file in time."""


# -- the runs ---------------------------------------------------------------------------------


def build_registry(tmp: Path, models: list[BenchModel]) -> dict[str, Any]:
    """Register the classes, push one seeded version each; return name -> (output, module)."""
    import torch

    from moduleserve.registry.api import open_registry
    from moduleserve.registry.classes import parse_input_spec
    from moduleserve.registry.config import RegistrySettings

    settings = RegistrySettings(
        db=f"sqlite:///{tmp}/registry.db",
        store=tmp / "store",
        allowed_class_prefixes=["moduleserve.registry.demo"],
    )
    reg = open_registry(settings, migrate_schema=True)
    built: dict[str, Any] = {}
    try:
        for model in models:
            cls = reg.classes.register(
                model.class_name,
                model.import_path,
                model.kwargs,
                [parse_input_spec(model.input_spec)],
            )
            torch.manual_seed(0)
            skeleton = reg.classes.build(cls, device="cpu")
            version = reg.push(
                model.name, skeleton.state_dict(), class_name=cls.name, alias="production"
            )
            output = cls.outputs[0]
            built[model.name] = (output.name, list(output.shape), reg.build_version(version))
    finally:
        reg.close()
    return built


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


def warm(target: str, request: bytes, count: int = 20) -> int:
    """Send ``count`` requests (the first loads the model); return the response size in bytes."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        size = 0
        for _ in range(count):
            size = len(call(request, timeout=120.0))
    return size


def server_command(tmp: Path, args: argparse.Namespace, workers: int | None) -> list[str]:
    """The ``moduleserve-server`` command line for the registry under ``tmp``."""
    cmd = [
        str(Path(sys.executable).parent / "moduleserve-server"),
        "--db", f"sqlite:///{tmp}/registry.db",
        "--store", str(tmp / "store"),
        "--grpc-port", "0",
        "--metrics-port", "0",
        "--port-file", str(tmp / "server.port"),
        "--allow-prefix", "moduleserve.registry.demo",
        "--max-batch-size", str(args.max_batch_size),
        "--max-queue-delay-ms", str(args.max_queue_delay_ms),
    ]  # fmt: skip
    return cmd + (["--workers", str(workers)] if workers else [])


@contextmanager
def server_running(tmp: Path, args: argparse.Namespace, info: dict[str, Any]) -> Iterator[int]:
    """Start ``moduleserve-server`` (retrying without --workers if refused); yield its pid."""
    log_path = tmp / "server.log"
    env = dict(item.split("=", 1) for item in args.server_env)
    workers = args.workers
    with ExitStack() as stack:
        while True:
            cmd = server_command(tmp, args, workers)
            try:
                pid, port, startup_s = stack.enter_context(
                    started(cmd, tmp / "server.port", log_path, env)
                )
                break
            except ServerStartError:
                if not (workers and "--workers" in log_tail(log_path)):
                    raise
                print(f"server: --workers {workers} refused, retrying without it")
                workers = None
        print(f"server: {shlex.join([*args.server_env, *cmd])}")
        print(f"server: pid {pid}, port {port}, up in {startup_s:.1f} s, log {log_path}")
        info.update(command=cmd, env=env, startup_s=startup_s, workers=workers, port=port)
        yield pid


@contextmanager
def echo_running(tmp: Path, model: BenchModel, response: bytes) -> Iterator[tuple[int, int]]:
    """Start the echo floor answering ``response``; yield (pid, port)."""
    response_file = tmp / f"{model.name}.response"
    response_file.write_bytes(response)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "echo_server.py"),
        f"--response-file={response_file}",
        f"--port-file={tmp / 'echo.port'}",
    ]
    with started(cmd, tmp / "echo.port", tmp / "echo.log") as (pid, port, _):
        yield pid, port


@dataclass
class Target:
    """One server under load: label, address, process tree, and statistics when it has them."""

    label: str
    address: str
    group: ProcessGroup
    stats: Callable[[], tuple[int, int] | None] | None = None


def run_targets(
    tmp: Path,
    models: list[BenchModel],
    built: dict[str, Any],
    requests: dict[str, Path],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    """Every N-run, echo then server for each (model, N), so both see the same machine."""
    skip = args.skip
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = report.setdefault("server", {})
    with ExitStack() as stack:
        server_pid = None
        if "server" not in skip:
            try:
                server_pid = stack.enter_context(server_running(tmp, args, info))
            except ServerStartError as err:
                print(f"server: {err}")
                info["error"] = str(err)
        print(HEADER)
        for model in models:
            with ExitStack() as per_model:
                targets: list[Target] = []
                request = requests[model.name].read_bytes()
                if "echo" not in skip:
                    output_name, output_shape, _ = built[model.name]
                    response = echo_response(model, output_name, output_shape)
                    report.setdefault("echo_response_bytes", {})[model.name] = len(response)
                    pid, port = per_model.enter_context(echo_running(tmp, model, response))
                    warm(f"127.0.0.1:{port}", request)
                    targets.append(Target("echo", f"127.0.0.1:{port}", ProcessGroup(pid)))
                if server_pid is not None:
                    address = f"127.0.0.1:{info['port']}"
                    info.setdefault("response_bytes", {})[model.name] = warm(address, request)
                    stats = Statistics(address)
                    per_model.callback(stats.close)
                    getter = partial(stats.rows_and_batches, model.name)
                    targets.append(Target("server", address, ProcessGroup(server_pid), getter))
                for n in args.concurrency:
                    for target in targets:
                        row = run_load(
                            target.address, requests[model.name], n, args, target.group,
                            target.stats,
                        )  # fmt: skip
                        row.update(model=model.name, target=target.label)
                        print_row(row)
                        rows.append(row)
    return rows


# -- report -----------------------------------------------------------------------------------

HEADER = (
    f"{'model':<6} {'target':<7} {'N':>3} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'batch':>6} {'srv CPU%':>8} {'us/req':>6} {'RSS MiB':>7} {'cli CPU%':>8} {'other%':>6} "
    f"{'errors':>6}"
)


def print_row(row: dict[str, Any]) -> None:
    batch = "n/a" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}"
    if row["target"] == "echo":
        batch = "-"
    print(
        f"{row['model']:<6} {row['target']:<7} {row['concurrency']:>3} {row['rps']:>8.0f} "
        f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {batch:>6} {row['server_cpu_pct']:>8.0f} "
        f"{row['server_cpu_us_per_request']:>6.0f} {row['server_rss_mib']:>7.0f} "
        f"{row['client_cpu_pct']:>8.0f} {row['other_cpu_pct']:>6.0f} "
        f"{row['errors']:>6}",
        flush=True,
    )


def check(label: str, value: float | None, op: str, bound: float, detail: str) -> dict[str, Any]:
    """One PASS/MISS line (never an assertion)."""
    if value is None:
        ok = None
        verdict = "n/a "
    else:
        ok = value >= bound if op == ">=" else value <= bound
        verdict = "PASS" if ok else "MISS"
    shown = "n/a" if value is None else f"{value:.3g}"
    print(f"{verdict} {label}: {shown} {op} {bound:.3g} ({detail})")
    return {"check": label, "value": value, "op": op, "bound": bound, "pass": ok}


def targets(rows: list[dict[str, Any]], models: list[BenchModel]) -> list[dict[str, Any]]:
    """The issue's targets, computed from the table."""
    by = {(r["model"], r["target"], r["concurrency"]): r for r in rows}
    out = []
    for model in models:
        m = model.name
        server, echo = by.get((m, "server", 64)), by.get((m, "echo", 64))
        if server and echo:
            ratio = server["rps"] / echo["rps"]
            out.append(check(f"{m} N=64 req/s / echo", ratio, ">=", 0.8,
                             f"{server['rps']:.0f} vs {echo['rps']:.0f} req/s"))  # fmt: skip
            out.append(check(f"{m} N=64 p99 ms", server["p99_ms"], "<=", 2 * echo["p99_ms"],
                             f"2 x echo p99 {echo['p99_ms']:.2f} ms"))  # fmt: skip
            if m == "mlp":
                out.append(check("mlp N=64 mean batch", server["mean_batch"], ">=", 8, "rows/pass"))
        server, echo = by.get((m, "server", 1)), by.get((m, "echo", 1))
        if server and echo:
            out.append(check(f"{m} N=1 p50 ms", server["p50_ms"], "<=", echo["p50_ms"] + 0.5,
                             f"echo p50 {echo['p50_ms']:.2f} ms + 0.5"))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the references and the server, print the table and targets, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per N")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per N")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated N values")
    parser.add_argument("--models", default="mynet,mlp", help=f"from {','.join(MODELS)}")
    parser.add_argument("--channels", type=int, default=1, help="client channels (connections)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=None, help="server processes, if supported")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server process (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    parser.add_argument("--inprocess-seconds", type=float, default=2.0)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for other jobs on the machine to finish",
    )
    parser.add_argument("--skip", default="", help="comma-separated of: inprocess,echo,server")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",")]
    args.skip = skip = set(filter(None, args.skip.split(",")))
    models = [MODELS[name] for name in args.models.split(",")]

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, grpcio {grpc.__version__}")  # fmt: skip
    busy = wait_quiet(args.wait_quiet, window_s=1.0)
    print(f"machine busy before start: {busy:.0f}% of one core (other jobs skew the results; "
          "the other% column is the CPU they used during each run)")  # fmt: skip
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    report["busy_before_start_pct"] = busy
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        built = build_registry(tmp, models)
        requests = {}
        for model in models:
            requests[model.name] = tmp / f"{model.name}.request"
            requests[model.name].write_bytes(infer_request(model))
        if "inprocess" not in skip:
            report["inprocess"] = run_inprocess(built, models, args)
        rows = run_targets(tmp, models, built, requests, args, report)
        print("response bytes: echo "
              f"{report.get('echo_response_bytes')}, server "
              f"{report.get('server', {}).get('response_bytes')}")  # fmt: skip
        report["rows"] = rows
        report["targets"] = targets(rows, models)
    report["environment"] = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
