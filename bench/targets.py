"""The servers a benchmark drives: the two echo floors and ``moduleserve-server`` on each
front end, started pinned to the server's CPUs, warmed, with their process trees.

Shared by ``bench.serve`` (Python load generator) and ``bench.h2load`` (h2load). Labels:

- ``echo-grpc``: ``bench/echo_server.py``, grpc.aio answering fixed bytes (grpc.aio's floor);
- ``echo-envoy``: ``bench/pyvoy_echo.py``, an ASGI app under pyvoy answering the same bytes
  (Envoy's floor);
- ``srv-grpc``, ``srv-envoy``: ``moduleserve-server --frontend grpc|envoy``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from bench.loadgen import MODEL_INFER
from bench.models import BenchModel
from bench.processes import ProcessGroup, ServerStartError, log_tail, started
from bench.references import echo_response, echo_running

MODEL_STATISTICS = "/inference.GRPCInferenceService/ModelStatistics"
ECHOES = {"echo-grpc": "grpc", "echo-envoy": "envoy"}
SERVERS = {"srv-grpc": "grpc", "srv-envoy": "envoy"}
LABELS = (*ECHOES, *SERVERS)
# --skip names that stand for several labels.
GROUPS = {"echo": set(ECHOES), "server": set(SERVERS)}


def skipped(skip: set[str]) -> set[str]:
    """The labels ``--skip`` names, groups expanded."""
    out = set(skip)
    for name in skip:
        out |= GROUPS.get(name, set())
    return out


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


def warm(target: str, request: bytes, count: int = 20) -> int:
    """Send ``count`` requests (the first loads the model); return the response size in bytes."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        size = 0
        for _ in range(count):
            size = len(call(request, timeout=120.0))
    return size


def server_command(
    tmp: Path, args: argparse.Namespace, frontend: str, workers: int | None, job_workers: int
) -> list[str]:
    """The ``moduleserve-server`` command line for the registry under ``tmp``."""
    cmd = [
        str(Path(sys.executable).parent / "moduleserve-server"),
        "--frontend", frontend,
        "--db", f"sqlite:///{tmp}/registry.db",
        "--store", str(tmp / "store"),
        "--grpc-port", "0",
        "--metrics-port", "0",
        "--port-file", str(tmp / f"server-{frontend}.port"),
        "--allow-prefix", "moduleserve.registry.demo",
        "--max-batch-size", str(args.max_batch_size),
        "--max-queue-delay-ms", str(args.max_queue_delay_ms),
        # Serving alone by default: a job worker importing torch would take CPU from the
        # measured windows (bench.finetune measures serving beside a training job).
        "--job-workers", str(job_workers),
    ]  # fmt: skip
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    return cmd + (["--workers", str(workers)] if workers else [])


@contextmanager
def server_running(
    tmp: Path, args: argparse.Namespace, frontend: str, info: dict[str, Any], job_workers: int = 0
) -> Iterator[int]:
    """Start ``moduleserve-server`` on ``args.server_cpus`` (retrying without --workers if
    refused); yield its pid."""
    log_path = tmp / f"server-{frontend}-j{job_workers}.log"
    env = dict(item.split("=", 1) for item in args.server_env)
    workers = args.workers
    with ExitStack() as stack:
        while True:
            cmd = server_command(tmp, args, frontend, workers, job_workers)
            try:
                pid, port, startup_s = stack.enter_context(
                    started(cmd, tmp / f"server-{frontend}.port", log_path, env, args.server_cpus)
                )
                break
            except ServerStartError:
                if not (workers and "--workers" in log_tail(log_path)):
                    raise
                print(f"server: --workers {workers} refused, retrying without it")
                workers = None
        print(f"server {frontend}: {shlex.join([*args.server_env, *cmd])}")
        print(f"server {frontend}: pid {pid}, port {port}, up in {startup_s:.1f} s, log {log_path}")
        info.update(command=cmd, env=env, startup_s=startup_s, workers=workers, port=port)
        yield pid


@dataclass
class Target:
    """One server under load: label, address, process tree, and statistics when it has them."""

    label: str
    address: str
    group: ProcessGroup
    stats: Callable[[], tuple[int, int] | None] | None = None


@contextmanager
def servers_running(
    tmp: Path, args: argparse.Namespace, report: dict[str, Any]
) -> Iterator[dict[str, int]]:
    """Start the servers not skipped, for the whole run; yield label -> pid."""
    skip = skipped(args.skip)
    pids: dict[str, int] = {}
    infos: dict[str, Any] = report.setdefault("servers", {})
    with ExitStack() as stack:
        for label, frontend in SERVERS.items():
            if label in skip:
                continue
            info = infos.setdefault(label, {})
            try:
                pids[label] = stack.enter_context(server_running(tmp, args, frontend, info))
            except ServerStartError as err:
                print(f"server {frontend}: {err}")
                info["error"] = str(err)
        yield pids


def model_targets(
    stack: ExitStack,
    tmp: Path,
    model: BenchModel,
    output: tuple[str, list[int]],
    request: bytes,
    servers: dict[str, int],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> list[Target]:
    """The targets for one model, warmed, in table order: the echo floors (started on
    ``stack``, answering a response of the real one's size), then the servers."""
    skip = skipped(args.skip)
    targets: list[Target] = []
    response = echo_response(model, *output)
    report.setdefault("echo_response_bytes", {})[model.name] = len(response)
    for label, kind in ECHOES.items():
        if label in skip:
            continue
        pid, port = stack.enter_context(echo_running(tmp, model, response, kind, args.server_cpus))
        address = f"127.0.0.1:{port}"
        warm(address, request)
        targets.append(Target(label, address, ProcessGroup(pid)))
    for label, pid in servers.items():
        info = report["servers"][label]
        address = f"127.0.0.1:{info['port']}"
        info.setdefault("response_bytes", {})[model.name] = warm(address, request)
        stats = Statistics(address)
        stack.callback(stats.close)
        getter = partial(stats.rows_and_batches, model.name)
        targets.append(Target(label, address, ProcessGroup(pid), getter))
    return targets


def add_target_options(parser: argparse.ArgumentParser, cpu_count: int) -> None:
    """The options that say how targets start (shared by bench.serve and bench.h2load)."""
    pin = cpu_count >= 2
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=None, help="server processes, if supported")
    parser.add_argument(
        "--server-cpus",
        default="0" if pin else "",
        help="CPUs the servers and echo floors run on, taskset -c style; '' for no pinning "
        "(default: 0 when the machine has 2 or more cores)",
    )
    parser.add_argument(
        "--client-cpus",
        default=f"1-{cpu_count - 1}" if pin else "",
        help="CPUs the load generator (and this process) run on (default: the others)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1 if pin else None,
        help="server --torch-threads (default: 1 when pinned; 0: the server's default)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server process (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated of: inprocess, echo, server, " + ", ".join(LABELS),
    )
