"""An idle fine-tuning worker's memory: RSS and USS of `python -m moduleserve.server.jobs.worker`
on an empty job queue, and which heavy packages its process has mapped; then the RSS of a
whole `moduleserve-server --load-all` process tree (the server with the demo models loaded,
plus its one idle job worker).

    .venv/bin/python -m bench.worker_idle [--runs 3] [--idle-s 3]
                                          [--out bench/results/worker_idle.json]

Each run starts a fresh worker on a throwaway SQLite registry (the demo models, no jobs), waits
for its "ready" log line, lets it poll the empty queue for ``--idle-s`` seconds, then samples.
"Mapped" lists the packages (torch, safetensors, numpy) that have a file (their compiled
extensions, libtorch) mapped into the worker: a package that was imported has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.processes import MIB, ROOT, ProcessGroup, stop_process, wait_for_port
from moduleserve.registry.api import Registry
from moduleserve.registry.config import RegistrySettings
from moduleserve.registry.demo.seed import seed_demo

HEAVY_PACKAGES = ("torch", "safetensors", "numpy")


def package_dirs(names: tuple[str, ...]) -> dict[str, str]:
    """Each installed package's folder, without importing it."""
    from importlib.util import find_spec

    dirs = {}
    for name in names:
        spec = find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs[name] = os.path.realpath(next(iter(spec.submodule_search_locations)))
    return dirs


def mapped_packages(pid: int, dirs: dict[str, str]) -> list[str]:
    """The packages of ``dirs`` that have a file mapped into process ``pid``."""
    paths = {os.path.realpath(m.path) for m in psutil.Process(pid).memory_maps(grouped=True)}
    return [name for name, d in dirs.items() if any(p.startswith(d + os.sep) for p in paths)]


def wait_ready(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """Read the worker's log until its "ready" line; return the lines read."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if " ready: " in line:
            return "".join(lines)
    raise RuntimeError("the worker did not report ready:\n" + "".join(lines))


def measure_once(env: dict[str, str], idle_s: float, dirs: dict[str, str]) -> dict[str, Any]:
    """Start one worker, let it idle, sample it, stop it."""
    cmd = [sys.executable, "-m", "moduleserve.server.jobs.worker", "--poll-s", "0.2"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc, 120)
        ready_s = time.perf_counter() - start
        time.sleep(idle_s)
        info = psutil.Process(proc.pid).memory_full_info()
        mapped = mapped_packages(proc.pid, dirs)
    finally:
        stop_process(proc)
    return {"rss_mib": info.rss / MIB, "uss_mib": info.uss / MIB, "ready_s": ready_s,
            "mapped": mapped}  # fmt: skip


def measure_server_tree(env: dict[str, str], idle_s: float, tmp: Path) -> dict[str, Any]:
    """`moduleserve-server --load-all` with one job worker: RSS of each process once the
    worker is ready and idle, and of the tree."""
    port_file = tmp / "port"
    cmd = [sys.executable, "-m", "moduleserve.server", "--load-all", "--grpc-port", "0"]
    cmd += ["--metrics-port", "0", "--port-file", str(port_file), "--job-workers", "1"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_ready(proc, 120)  # the worker logs last: the models loaded before the port
        if wait_for_port(port_file, proc, 60) is None:  # type: ignore[arg-type]
            raise RuntimeError("the server did not write its port")
        time.sleep(idle_s)
        group = ProcessGroup(proc.pid)
        each = {" ".join(p.cmdline()[1:3]): p.memory_info().rss / MIB for p in group.processes}
        total = group.rss_mib()
    finally:
        stop_process(proc)  # type: ignore[arg-type]
    return {"processes_rss_mib": each, "tree_rss_mib": total}


def main() -> None:
    """Measure and print a table; write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/worker_idle.json")
    args = p.parse_args()
    dirs = package_dirs(HEAVY_PACKAGES)
    with tempfile.TemporaryDirectory() as tmp:
        settings = RegistrySettings(db=f"sqlite:///{tmp}/registry.db", store=Path(tmp) / "store")
        registry = Registry(settings)
        registry.init()
        seed_demo(registry)
        registry.close()
        env = {**os.environ, "MODULESERVE_DB": settings.database_url(),
               "MODULESERVE_STORE": str(settings.store)}  # fmt: skip
        runs = [measure_once(env, args.idle_s, dirs) for _ in range(args.runs)]
        tree = measure_server_tree(env, args.idle_s, Path(tmp))
    print(f"{'run':>3} {'RSS MiB':>8} {'USS MiB':>8} {'ready s':>8}  mapped")
    for index, run in enumerate(runs, 1):
        print(
            f"{index:>3} {run['rss_mib']:>8.1f} {run['uss_mib']:>8.1f} {run['ready_s']:>8.2f}  "
            f"{', '.join(run['mapped']) or '-'}"
        )
    median = {k: statistics.median(r[k] for r in runs) for k in ("rss_mib", "uss_mib", "ready_s")}
    print(f"med {median['rss_mib']:>8.1f} {median['uss_mib']:>8.1f} {median['ready_s']:>8.2f}")
    print("\nserver tree (--load-all: mynet, nested, mlp; one idle job worker)")
    for name, rss in tree["processes_rss_mib"].items():
        print(f"  {rss:>8.1f} MiB  {name}")
    print(f"  {tree['tree_rss_mib']:>8.1f} MiB  total")
    report = {
        "runs": runs,
        "server_tree": tree,
        "median": median,
        "idle_s": args.idle_s,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
