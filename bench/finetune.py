"""Benchmark fine-tuning: what the job machinery costs, and what a training job does to latency.

Run from the repository root: ``.venv/bin/python -m bench.finetune``.

Part 1 (overhead) trains the same model, data and batch size, on one torch thread each,
(a) with a minimal PyTorch loop in this process and (b) as a real job: a throwaway SQLite
registry, the job queued, a ``python -m moduleserve.server.jobs.worker`` process (nice 0)
running it.
The job's examples/s come from its stored events: from ``running`` to its last ``epoch``
event, and from ``running`` to ``succeeded``. Plain and job runs alternate ``--repeats`` times.

Part 2 (latency) starts ``python -m moduleserve.server`` with one job worker (default nice 10) and
measures single-sample ``ModelClient.infer("mynet", x)`` latency at concurrency 1, first
with no job, then while a long job trains (cancelled afterwards).

Prints one table per part and writes ``bench/results/finetune.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry, open_registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.config import RegistrySettings
from moduleserve.registry.demo.seed import seed_demo
from moduleserve.registry.entities import JobEvent
from moduleserve.registry.jobspec import JobSpec
from moduleserve.server.jobs.data import steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "finetune.json"
MODEL, CLASS_NAME, DATASET = "mlpbench", "MLPBench", "synthetic"
IMPORT_PATH = "moduleserve.registry.demo.models:MLP"
KWARGS = {"in_features": 784, "hidden": [256, 256], "out_features": 10, "dropout": 0.1}
INPUT_SPEC = "x:float32:-1,784"
LEARNING_RATE, SEED, CLASSES = 1e-3, 0, 10
# The job's; the plain loop hard-codes the same (AdamW, cross_entropy, no validation split).
HYPERPARAMETERS: dict[str, Any] = {
    "optimizer": "adamw", "learning_rate": LEARNING_RATE, "loss": "cross_entropy", "seed": SEED,
    "val_split": 0.0,
}  # fmt: skip
LONG_JOB_EPOCHS = 10_000  # part 2's job: cancelled long before it ends
JOB_TIMEOUT_S = 3600.0
ACTOR = "bench/finetune.py"


# -- registry and data ------------------------------------------------------------------------


def synthetic_data(examples: int) -> dict[str, torch.Tensor]:
    """Learnable data: 784 standard-normal features, target = argmax of the first ten."""
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.randn(examples, KWARGS["in_features"], generator=generator)
    return {"inputs": inputs, "targets": inputs[:, :CLASSES].argmax(dim=1)}


def open_throwaway(tmp: Path) -> Registry:
    """A migrated SQLite registry under ``tmp``."""
    settings = RegistrySettings(
        db=f"sqlite:///{tmp}/registry.db",
        store=tmp / "store",
        allowed_class_prefixes=["moduleserve.registry.demo"],
    )
    return open_registry(settings, migrate_schema=True)


def add_bench_model(registry: Registry, data: dict[str, torch.Tensor]) -> None:
    """Register the benchmark MLP, push one seeded version and the dataset."""
    cls = registry.classes.register(CLASS_NAME, IMPORT_PATH, KWARGS, [parse_input_spec(INPUT_SPEC)])
    torch.manual_seed(SEED)
    skeleton = registry.classes.build(cls, device="cpu")
    registry.push(MODEL, skeleton.state_dict(), class_name=cls.name, alias="production")
    registry.push_dataset(DATASET, data)


def queue_job(registry: Registry, epochs: int, batch_size: int) -> str:
    """Queue a job on the benchmark model and dataset; return its id."""
    spec = JobSpec(**HYPERPARAMETERS, epochs=epochs, batch_size=batch_size).check()
    base = registry.checkpoints.resolve(MODEL, "")
    digest = registry.datasets.get(DATASET).digest
    job = registry.jobs.create(base, DATASET, digest, spec.to_dict(), alias=None, created_by=ACTOR)
    return job.id


def examples_per_epoch(examples: int, batch_size: int) -> int:
    """Examples one epoch trains on (the job drops a trailing batch of exactly one)."""
    return min(steps_per_epoch(examples, batch_size) * batch_size, examples)


# -- processes --------------------------------------------------------------------------------


@contextmanager
def process(cmd: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group; on exit SIGTERM it, then SIGKILL the group."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the process, wait up to ``grace_s``, then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # e.g. the server's job worker
    proc.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    """Poll ``ready`` twice a second; raise if ``proc`` exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s:\n{log_tail(log)}")
        time.sleep(0.5)


def worker_command(tmp: Path) -> list[str]:
    """A job worker on the throwaway registry: one torch thread, normal priority."""
    return [
        sys.executable, "-m", "moduleserve.server.jobs.worker",
        "--db", f"sqlite:///{tmp}/registry.db", "--store", str(tmp / "store"),
        "--allow-prefix", "moduleserve.registry.demo", "--torch-threads", "1", "--nice", "0",
        "--poll-s", "0.2", "--worker-id", "bench-worker",
    ]  # fmt: skip


def server_command(tmp: Path) -> list[str]:
    """The server with one job worker (default nice), on the throwaway registry."""
    return [
        sys.executable, "-m", "moduleserve.server",
        "--db", f"sqlite:///{tmp}/registry.db", "--store", str(tmp / "store"),
        "--allow-prefix", "moduleserve.registry.demo", "--grpc-port", "0",
        "--port-file", str(tmp / "server.port"), "--no-metrics",
        "--job-workers", "1", "--job-torch-threads", "1",
    ]  # fmt: skip


# -- part 1: job machinery overhead -----------------------------------------------------------


def plain_run(
    registry: Registry, data: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """The minimal loop: shuffle per epoch, forward, loss, backward, step; examples/s."""
    torch.set_num_threads(1)
    module = registry.load_module(MODEL)  # the job's base weights
    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(SEED)
    module.train()
    examples, loss, steps = 0, 0.0, steps_per_epoch(args.examples, args.batch_size)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(args.examples, generator=generator)
        done, loss = plain_epoch(module, optimizer, data, order, args.batch_size)
        examples += done
    seconds = time.perf_counter() - start
    return {"examples": examples, "steps": args.epochs * steps, "seconds": seconds,
            "rate": examples / seconds, "loss": loss}  # fmt: skip


def plain_epoch(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: dict[str, torch.Tensor],
    order: torch.Tensor,
    batch_size: int,
) -> tuple[int, float]:
    """One epoch in the job's batches; (examples, mean loss)."""
    inputs, targets = data["inputs"], data["targets"]
    steps = steps_per_epoch(len(order), batch_size)
    examples, loss_sum = 0, torch.zeros(())
    for start in range(0, steps * batch_size, batch_size):
        index = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(inputs[index]), targets[index])
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        examples += len(index)
    return examples, loss_sum.item() / steps


def job_run(tmp: Path, registry: Registry, args: argparse.Namespace) -> dict[str, Any]:
    """Queue a job, run it in a fresh worker process, read its rates from its events."""
    job_id = queue_job(registry, args.epochs, args.batch_size)
    log = tmp / f"worker-{job_id}.log"
    with process(worker_command(tmp), log) as proc:
        wait_until(lambda: registry.jobs.get(job_id).finished, proc, log, JOB_TIMEOUT_S)
    job = registry.jobs.get(job_id)
    if job.state != "succeeded":
        raise RuntimeError(f"job {job_id} {job.state}: {job.reason}\n{log_tail(log)}")
    examples = args.epochs * examples_per_epoch(args.examples, args.batch_size)
    result = job_timings(registry.jobs.events(job_id), examples, args.batch_size)
    result.update(job=job_id, steps=job.metrics.get("steps"), loss=job.metrics.get("train_loss"))
    return result


def job_timings(events: list[JobEvent], examples: int, batch_size: int) -> dict[str, Any]:
    """Rates over running→last epoch (span) and running→succeeded (total), and steps only."""
    states = {e.data["state"]: e.at for e in events if e.kind == "state"}
    epochs = [e for e in events if e.kind == "epoch"]
    progress = [e for e in events if e.kind == "progress"]
    span_s = (epochs[-1].at - states["running"]).total_seconds()
    total_s = (states["succeeded"] - states["running"]).total_seconds()
    steps_rate = steps_only_rate(progress, batch_size)
    first_s = (progress[0].at - states["running"]).total_seconds() if progress else 0.0
    first_steps = progress[0].data["step"] * batch_size / steps_rate if progress else 0.0
    return {
        "examples": examples,
        "span_s": span_s,
        "total_s": total_s,
        "span_rate": examples / span_s,
        "total_rate": examples / total_s,
        "steps_rate": steps_rate,
        "setup_s": first_s - first_steps,  # load weights and data, build optimizer
        "outside_steps_s": span_s - examples / steps_rate,
    }


def steps_only_rate(progress: list[JobEvent], batch_size: int) -> float:
    """Examples/s of the optimizer steps alone, from the progress events' own timings."""
    examples, seconds, previous = 0, 0.0, 0
    for event in progress:
        done = (event.data["step"] - previous) * batch_size
        examples += done
        seconds += done / event.data["examples_per_second"]
        previous = event.data["step"]
    return examples / seconds if seconds else float("nan")


def overhead_part(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Alternate plain and job runs ``--repeats`` times; medians and every run."""
    data = synthetic_data(args.examples)
    registry = open_throwaway(tmp)
    try:
        add_bench_model(registry, data)
        print(OVERHEAD_HEADER, flush=True)
        runs = []
        for index in range(1, args.repeats + 1):
            plain = plain_run(registry, data, args)
            job = job_run(tmp, registry, args)
            runs.append({"run": index, "plain": plain, "job": job})
            print_overhead_row(str(index), plain["rate"], job)
            if (plain["steps"], plain["examples"]) != (job["steps"], job["examples"]):
                print(f"WARNING: plain and job differ: {plain['steps']} vs {job['steps']} steps")
    finally:
        registry.close()
    summary = summarize(runs)
    print_overhead_row("median", summary["plain_rate"], summary)
    return {"runs": runs, "median": summary}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median rates and the overheads computed from them."""
    plain = statistics.median(r["plain"]["rate"] for r in runs)
    keys = ("span_rate", "total_rate", "steps_rate", "setup_s", "outside_steps_s")
    summary = {key: statistics.median(r["job"][key] for r in runs) for key in keys}
    summary["plain_rate"] = plain
    summary["overhead_span_pct"] = 100.0 * (1 - summary["span_rate"] / plain)
    summary["overhead_total_pct"] = 100.0 * (1 - summary["total_rate"] / plain)
    return summary


OVERHEAD_HEADER = (
    f"{'run':<6} {'plain ex/s':>10} {'job span':>9} {'job total':>9} {'job steps':>9} "
    f"{'ovh span':>8} {'ovh total':>9} {'setup s':>7} {'outside s':>9}"
)


def print_overhead_row(label: str, plain: float, job: dict[str, Any]) -> None:
    """One row of the overhead table."""
    span, total = 100.0 * (1 - job["span_rate"] / plain), 100.0 * (1 - job["total_rate"] / plain)
    print(
        f"{label:<6} {plain:>10.0f} {job['span_rate']:>9.0f} {job['total_rate']:>9.0f} "
        f"{job['steps_rate']:>9.0f} {span:>7.1f}% {total:>8.1f}% {job['setup_s']:>7.2f} "
        f"{job['outside_steps_s']:>9.2f}",
        flush=True,
    )


# -- part 2: inference latency while a job trains --------------------------------------------


def latency_window(client: ModelClient, seconds: float, warmup: int = 200) -> dict[str, Any]:
    """c=1 single-sample mynet latency over ``seconds`` after ``warmup`` requests."""
    x = np.random.default_rng(SEED).standard_normal((3, 8, 8), dtype=np.float32)
    for _ in range(warmup):
        client.infer("mynet", x)
    latencies: list[int] = []
    start = time.perf_counter_ns()
    end = start + int(seconds * 1e9)
    while (now := time.perf_counter_ns()) < end:
        client.infer("mynet", x)
        latencies.append(time.perf_counter_ns() - now)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        **{f"p{q}_ms": cuts[q - 1] / 1e6 for q in (50, 90, 99)},
    }


def job_step(registry: Registry, job_id: str) -> int:
    """The optimizer step of the job's latest progress event (0 before the first)."""
    progress = registry.jobs.get(job_id).progress
    return int(progress.data["step"]) if progress is not None else 0


def with_job(
    registry: Registry,
    client: ModelClient,
    proc: subprocess.Popen[bytes],
    log: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Queue a long job, measure a window while it trains, then cancel it."""
    job_id = queue_job(registry, LONG_JOB_EPOCHS, args.batch_size)
    try:
        # Its first progress event: past loading, the optimizer steps have begun.
        wait_until(lambda: job_step(registry, job_id) > 0, proc, log, 120.0)
        step0, t0 = job_step(registry, job_id), time.perf_counter()
        window = latency_window(client, args.duration)
        steps = job_step(registry, job_id) - step0
        window["job_examples_per_s"] = steps * args.batch_size / (time.perf_counter() - t0)
        window["job"] = job_id
    finally:
        registry.jobs.request_cancel(job_id, ACTOR)
    wait_until(lambda: registry.jobs.get(job_id).finished, proc, log, 60.0)
    window["job_state_after_cancel"] = registry.jobs.get(job_id).state
    return window


def latency_part(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The server with one job worker: latency with no job, then while a job trains."""
    registry = open_throwaway(tmp)
    log = tmp / "server.log"
    try:
        seed_demo(registry)
        add_bench_model(registry, synthetic_data(args.examples))
        with process(server_command(tmp), log) as proc:
            port_file = tmp / "server.port"
            wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "", proc,
                       log, 120.0)  # fmt: skip
            with ModelClient(f"127.0.0.1:{int(port_file.read_text())}") as client:
                idle = latency_window(client, args.duration)
                busy = with_job(registry, client, proc, log, args)
    finally:
        registry.close()
    print_latency(idle, busy)
    return {"no_job": idle, "job_training": busy, "p50_ratio": busy["p50_ms"] / idle["p50_ms"]}


def print_latency(idle: dict[str, Any], busy: dict[str, Any]) -> None:
    """The latency table and the p50 ratio."""
    print(f"{'mynet c=1':<13} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'req/s':>7} "
          f"{'job ex/s':>8}")  # fmt: skip
    for label, row in (("no job", idle), ("job training", busy)):
        job_rate = row.get("job_examples_per_s")
        shown = "-" if job_rate is None else f"{job_rate:.0f}"
        print(f"{label:<13} {row['p50_ms']:>7.2f} {row['p90_ms']:>7.2f} {row['p99_ms']:>7.2f} "
              f"{row['rps']:>7.0f} {shown:>8}")  # fmt: skip
    print(f"p50 with job / without: {busy['p50_ms'] / idle['p50_ms']:.2f}x", flush=True)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each part-1 run")
    parser.add_argument("--examples", type=int, default=16384, help="synthetic examples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="plain/job pairs in part 1")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per latency window")
    parser.add_argument("--skip-overhead", action="store_true", help="skip part 1")
    parser.add_argument("--skip-latency", action="store_true", help="skip part 2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run both parts, print their tables, write the JSON."""
    args = parse_args(argv)
    # SIGTERM (and SIGINT, even when started in the background) unwind like Ctrl-C, so the
    # finally blocks stop the worker and server processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    load = os.getloadavg()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {load[0]:.2f} (other jobs skew the results)")  # fmt: skip
    report: dict[str, Any] = {
        "settings": {**vars(args), "out": str(args.out), "torch_threads": 1},
        "model": {"import_path": IMPORT_PATH, "kwargs": KWARGS},
        "hyperparameters": HYPERPARAMETERS,
        "environment": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "load_average_at_start": load},
    }  # fmt: skip
    if not args.skip_overhead:
        with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
            report["overhead"] = overhead_part(Path(tmp), args)
    if not args.skip_latency:
        with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
            report["latency"] = latency_part(Path(tmp), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
