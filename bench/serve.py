"""Benchmark the inference server on both front ends against their echo floors and in-process
torch.

Run from the repository root: ``.venv/bin/python -m bench.serve``. For each model it measures
in-process samples/s (one sample at a time and in batches of the maximum batch size), then, for
each N, in turn: the two echo floors (grpc.aio, ``bench/echo_server.py``; Envoy via pyvoy,
``bench/pyvoy_echo.py``: both answer a same-sized response without doing any work) and
``moduleserve-server --frontend grpc`` and ``--frontend envoy`` (``bench/targets.py``), each
driven by N concurrent closed-loop single-sample ModelInfer calls from a separate
load-generator process (``bench/loadgen.py``). Servers run on one core, the load generator on
the others. Prints one table and the target checks (``bench/report.py``), then the RSS with an
idle job worker, and writes ``bench/results/serve.json``.
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
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc

from bench.models import MODELS, BenchModel, build_registry, infer_request
from bench.processes import (
    ROOT,
    ProcessGroup,
    ServerStartError,
    machine_busy_s,
    parse_cpus,
    pinned,
    wait_quiet,
)
from bench.references import run_inprocess
from bench.report import HEADER, limited_by, print_row, targets, write_report
from bench.targets import (
    SERVERS,
    add_target_options,
    mean_batch,
    model_targets,
    server_running,
    servers_running,
    skipped,
    warm,
)

RESULTS = ROOT / "bench" / "results" / "serve.json"
JOB_WORKER = "moduleserve.server.jobs.worker"


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
        pinned(cmd, args.client_cpus),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    if (line := proc.stdout.readline().strip()) != "START":
        raise RuntimeError(f"load generator failed ({line!r}):\n{proc.communicate()[1]}")
    group.start()
    busy0, own0 = machine_busy_s(), time.process_time()
    before = stats() if stats else None
    if (line := proc.stdout.readline().strip()) != "END":
        raise RuntimeError(f"load generator failed ({line!r}):\n{proc.communicate()[1]}")
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


def run_targets(
    tmp: Path,
    models: list[BenchModel],
    built: dict[str, Any],
    requests: dict[str, Path],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    """Every N-run: for each (model, N) every target in turn, so all see the same machine."""
    rows: list[dict[str, Any]] = []
    with servers_running(tmp, args, report) as servers:
        print(HEADER)
        for model in models:
            with ExitStack() as per_model:
                output_name, output_shape, _ = built[model.name]
                request = requests[model.name].read_bytes()
                targets = model_targets(
                    per_model, tmp, model, (output_name, output_shape), request, servers, args,
                    report,
                )  # fmt: skip
                for n in args.concurrency:
                    for target in targets:
                        row = run_load(
                            target.address, requests[model.name], n, args, target.group,
                            target.stats,
                        )  # fmt: skip
                        row.update(model=model.name, target=target.label)
                        row["limited_by"] = limited_by(row)
                        print_row(row)
                        rows.append(row)
    return rows


def settled_rss(group: ProcessGroup, timeout_s: float = 30.0) -> float:
    """The tree's RSS once it stops growing by more than 1 MiB a second (a job worker
    imports torch after the server is up)."""
    deadline = time.monotonic() + timeout_s
    last = group.rss_mib()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = group.rss_mib()
        if abs(now - last) < 1.0:
            return now
        last = now
    return last


def job_worker_rss(
    tmp: Path, models: list[BenchModel], requests: dict[str, Path], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Each front end once more with ``--job-workers 1``: after warming each model, the
    RSS of the whole tree and of the idle job worker alone (no load, RSS only)."""
    rows: list[dict[str, Any]] = []
    skip = skipped(args.skip)
    print(f"\n{'model':<6} {'target':<10} {'job workers':>11} {'tree RSS MiB':>12} "
          f"{'worker MiB':>10} {'without MiB':>11}")  # fmt: skip
    for label, frontend in SERVERS.items():
        if label in skip:
            continue
        info: dict[str, Any] = {}
        try:
            with server_running(tmp, args, frontend, info, job_workers=1) as pid:
                group = ProcessGroup(pid)
                address = f"127.0.0.1:{info['port']}"
                for model in models:
                    warm(address, requests[model.name].read_bytes())
                    total = settled_rss(group)
                    worker = group.rss_mib(only=JOB_WORKER)
                    row = {"model": model.name, "target": label, "job_workers": 1,
                           "rss_mib": total, "job_worker_rss_mib": worker}  # fmt: skip
                    print(f"{model.name:<6} {label:<10} {1:>11} {total:>12.0f} {worker:>10.0f} "
                          f"{total - worker:>11.0f}", flush=True)  # fmt: skip
                    rows.append(row)
        except ServerStartError as err:
            print(f"server {frontend} --job-workers 1: {err}")
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
    parser.add_argument("--inprocess-seconds", type=float, default=2.0)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for other jobs on the machine to finish",
    )
    parser.add_argument(
        "--no-job-worker-rss",
        action="store_true",
        help="skip the extra --job-workers 1 start per front end (RSS only)",
    )
    add_target_options(parser, os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",")]
    args.skip = skip = set(filter(None, args.skip.split(",")))
    args.server_cpus, args.client_cpus = parse_cpus(args.server_cpus), parse_cpus(args.client_cpus)
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
        if args.client_cpus:
            # This process samples the servers: keep it off their CPUs too.
            os.sched_setaffinity(0, args.client_cpus)
        print(f"pinning: servers on CPUs {sorted(args.server_cpus) or 'any'}, load generator on "
              f"{sorted(args.client_cpus) or 'any'}, server --torch-threads "
              f"{args.torch_threads or 'default'}")  # fmt: skip
        rows = run_targets(tmp, models, built, requests, args, report)
        servers = report.get("servers", {})
        print(f"response bytes: echo {report.get('echo_response_bytes')}, servers "
              f"{ {k: v.get('response_bytes') for k, v in servers.items()} }")  # fmt: skip
        report["rows"] = rows
        report["targets"] = targets(rows, models)
        if not args.no_job_worker_rss:
            report["job_worker_rss"] = job_worker_rss(tmp, models, requests, args)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
