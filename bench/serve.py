"""Benchmark the inference server against the Python gRPC echo floor and in-process torch.

Run from the repository root: ``.venv/bin/python -m bench.serve``. For each model it measures
(b) in-process samples/s (one sample at a time and in batches of the maximum batch size),
(a) the echo floor (``bench/echo_server.py``: a grpc.aio server answering a same-sized response
without doing any work) and the real ``moduleserve-server``, each driven by N concurrent
closed-loop single-sample ModelInfer calls from a separate load-generator process
(``bench/loadgen.py``). Prints one table and the target checks (``bench/report.py``), and writes
``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from bench.loadgen import MODEL_INFER
from bench.models import MODELS, BenchModel, build_registry, infer_request
from bench.processes import (
    ROOT,
    ProcessGroup,
    ServerStartError,
    log_tail,
    machine_busy_s,
    started,
    wait_quiet,
)
from bench.references import echo_response, echo_running, run_inprocess
from bench.report import HEADER, print_row, targets, write_report

RESULTS = ROOT / "bench" / "results" / "serve.json"
MODEL_STATISTICS = "/inference.GRPCInferenceService/ModelStatistics"


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
        "-m",
        "bench.loadgen",
        f"--target={target}",
        f"--request-file={request_file}",
        f"--concurrency={concurrency}",
        f"--channels={args.channels}",
        f"--warmup={args.warmup}",
        f"--duration={args.duration}",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
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
        # Serving alone: a job worker importing torch would take CPU from the measured
        # windows (bench.finetune measures serving beside a training job).
        "--job-workers", "0",
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


def main(argv: list[str] | None = None) -> int:
    """Run the references and the server, print the table and targets, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
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
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
