"""Drive the same targets as ``bench.serve`` with h2load, a C HTTP/2 load generator.

Run from the repository root: ``.venv/bin/python -m bench.h2load``. For when the Python load
generator saturates its core (``bench.serve`` marks such rows ``cli``): h2load sends the
prebuilt length-prefixed single-sample ModelInferRequest as a gRPC call
(``-d FILE -H 'content-type: application/grpc' -H 'te: trailers'``) over C connections x
S streams each (C x S = N), for each model, N and target (``bench/targets.py``: both echo
floors and ``moduleserve-server`` on both front ends, on one core). Reports req/s, h2load's
mean latency, server CPU and rows/s (from ModelStatistics: a check that the calls were
inferences, since h2load does not read gRPC trailers), h2load's own CPU, and writes
``bench/results/h2load.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import MODEL_INFER
from bench.models import MODELS, build_registry, infer_request
from bench.processes import ROOT, machine_busy_s, parse_cpus, pinned, wait_quiet
from bench.pyvoy_echo import frame
from bench.report import SATURATED_PCT, write_report
from bench.targets import Target, add_target_options, model_targets, servers_running

RESULTS = ROOT / "bench" / "results" / "h2load.json"
# Inside h2load's measured window, so the CPU and statistics samples never see its warm-up
# or its shutdown.
MARGIN_S = 0.25
HEADER = (
    f"{'model':<6} {'target':<10} {'N':>3} {'C x S':>6} {'req/s':>8} {'mean ms':>7} "
    f"{'srv rows/s':>10} {'batch':>6} {'srv CPU%':>8} {'us/req':>6} {'h2l CPU%':>8} "
    f"{'other%':>6} {'failed':>6}"
)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def split(concurrency: int, max_connections: int) -> tuple[int, int]:
    """Connections and streams per connection whose product is ``concurrency``: as many
    connections as allowed that divide it evenly (64 over at most 4: 4 x 16)."""
    clients = max(1, min(max_connections, concurrency))
    while concurrency % clients:
        clients -= 1
    return clients, concurrency // clients


def _ms(text: str) -> float:
    """An h2load duration (``514us``, ``2.35ms``, ``1.2s``) in milliseconds."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_output(text: str) -> dict[str, Any]:
    """The numbers of h2load's summary: req/s over the main duration, request counts, and
    the request time's min/max/mean/sd in milliseconds."""
    out: dict[str, Any] = {}
    finished = re.search(r"^finished in ([0-9.]+)(us|ms|s), ([0-9.]+) req/s", text, re.M)
    if not finished:
        raise ValueError(f"no summary in h2load's output:\n{text[-2000:]}")
    out["rps"] = float(finished[3])
    requests = re.search(r"^requests: (.*)$", text, re.M)
    if requests:
        for count, name in re.findall(r"(\d+) (\w+)", requests[1]):
            out[f"requests_{name}"] = int(count)
    statuses = re.search(r"^status codes: (.*)$", text, re.M)
    if statuses:
        for count, name in re.findall(r"(\d+) (\dxx)", statuses[1]):
            out[f"status_{name}"] = int(count)
    timing = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if timing:
        keys = ("min_ms", "max_ms", "mean_ms", "sd_ms")
        out.update((key, _ms(value)) for key, value in zip(keys, timing.groups(), strict=True))
    return out


def h2load_command(
    address: str, body: Path, concurrency: int, args: argparse.Namespace
) -> list[str]:
    """The h2load command line for one run (one thread: the client gets one core)."""
    clients, streams = split(concurrency, args.max_connections)
    return [
        args.h2load,
        "-t", "1",
        "-c", str(clients),
        "-m", str(streams),
        "-D", str(args.duration),
        "--warm-up-time", str(args.warmup),
        "-d", str(body),
        "-H", "content-type: application/grpc",
        "-H", "te: trailers",
        f"http://{address}{MODEL_INFER}",
    ]  # fmt: skip


def run_h2load(
    target: Target, body: Path, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One N-run: start h2load, sample the server and h2load inside its measured window."""
    cmd = h2load_command(target.address, body, concurrency, args)
    proc = subprocess.Popen(
        pinned(cmd, args.client_cpus), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = psutil.Process(proc.pid)
    started = time.perf_counter()
    time.sleep(args.warmup + MARGIN_S)
    target.group.start()
    cpu0, busy0, wall0 = sum(client.cpu_times()[:2]), machine_busy_s(), time.perf_counter()
    before = target.stats() if target.stats else None
    time.sleep(max(0.1, started + args.warmup + args.duration - MARGIN_S - time.perf_counter()))
    window_s = time.perf_counter() - wall0
    server_pct, rss_mib = target.group.cpu_pct(), target.group.rss_mib()
    client_pct = 100.0 * (sum(client.cpu_times()[:2]) - cpu0) / window_s
    machine_pct = 100.0 * (machine_busy_s() - busy0) / window_s
    after = target.stats() if target.stats else None
    out, _ = proc.communicate(timeout=args.duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{out[-2000:]}")
    row: dict[str, Any] = parse_output(out)
    clients, streams = split(concurrency, args.max_connections)
    row.update(
        concurrency=concurrency,
        connections=clients,
        streams=streams,
        server_cpu_pct=server_pct,
        server_rss_mib=rss_mib,
        server_cpu_us_per_request=1e4 * server_pct / row["rps"] if row["rps"] else 0.0,
        client_cpu_pct=client_pct,
        other_cpu_pct=max(0.0, machine_pct - server_pct - client_pct),
        command=cmd,
    )
    if before is not None and after is not None:
        rows, passes = after[0] - before[0], after[1] - before[1]
        row["server_rows_per_s"] = rows / window_s
        row["mean_batch"] = rows / passes if passes else None
    return row


def print_row(row: dict[str, Any]) -> None:
    """One table line."""
    rows = row.get("server_rows_per_s")
    batch = row.get("mean_batch")
    rows_text = "-" if rows is None else f"{rows:.0f}"
    batch_text = "-" if batch is None else f"{batch:.1f}"
    failed = row.get("requests_failed", 0) + row.get("requests_errored", 0)
    shape = f"{row['connections']}x{row['streams']}"
    print(
        f"{row['model']:<6} {row['target']:<10} {row['concurrency']:>3} {shape:>6} "
        f"{row['rps']:>8.0f} {row.get('mean_ms', 0.0):>7.2f} "
        f"{rows_text:>10} {batch_text:>6} "
        f"{row['server_cpu_pct']:>8.0f} {row['server_cpu_us_per_request']:>6.0f} "
        f"{row['client_cpu_pct']:>8.0f} {row['other_cpu_pct']:>6.0f} {failed:>6}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Start the targets, drive each with h2load, print the table, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per N")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured seconds per N")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated N values")
    parser.add_argument("--models", default="mynet,mlp", help=f"from {','.join(MODELS)}")
    parser.add_argument(
        "--max-connections", type=int, default=4, help="h2load -c at most (N = -c x -m)"
    )
    parser.add_argument("--h2load", default=shutil.which("h2load") or "h2load")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S")
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_target_options(parser, os.cpu_count() or 1)
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",")]
    args.skip = set(filter(None, args.skip.split(",")))
    args.server_cpus, args.client_cpus = parse_cpus(args.server_cpus), parse_cpus(args.client_cpus)
    models = [MODELS[name] for name in args.models.split(",")]
    version = subprocess.run([args.h2load, "--version"], capture_output=True, text=True).stdout
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"{os.cpu_count()} CPUs, {version.strip()}, servers on CPUs "
          f"{sorted(args.server_cpus) or 'any'}, "
          f"h2load on {sorted(args.client_cpus) or 'any'}")  # fmt: skip
    busy = wait_quiet(args.wait_quiet, window_s=1.0)
    print(f"machine busy before start: {busy:.0f}% of one core")
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    report.update(busy_before_start_pct=busy, h2load_version=version.strip())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp_name:
        tmp = Path(tmp_name)
        built = build_registry(tmp, models)
        if args.client_cpus:
            os.sched_setaffinity(0, args.client_cpus)  # off the servers' CPUs
        with servers_running(tmp, args, report) as servers:
            print(HEADER)
            for model in models:
                request = infer_request(model)
                body = tmp / f"{model.name}.grpc-body"
                body.write_bytes(frame(request))
                with ExitStack() as per_model:
                    output_name, output_shape, _ = built[model.name]
                    targets = model_targets(
                        per_model, tmp, model, (output_name, output_shape), request, servers,
                        args, report,
                    )  # fmt: skip
                    for n in args.concurrency:
                        for target in targets:
                            row = run_h2load(target, body, n, args)
                            row.update(model=model.name, target=target.label)
                            row["client_saturated"] = row["client_cpu_pct"] >= SATURATED_PCT
                            print_row(row)
                            rows.append(row)
    report["rows"] = rows
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
