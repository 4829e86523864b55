"""Benchmark tensor_summaries on a ~100M-parameter model: wall time and peak RSS increase.

Run from the repository root: ``.venv/bin/python -m bench.introspect``. Prints a table and
writes ``bench/results/introspect.json``. A naive variant that converts each whole tensor to
float64 at once runs alongside, to show what the chunked statistics save in memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from moduleserve.registry.introspect import DEFAULT_CHUNK_ELEMENTS, tensor_summaries, totals

RESULTS = Path(__file__).resolve().parent / "results" / "introspect.json"
MIB = 1 << 20


class PeakRss:
    """Sample a process's RSS (default: this one) in a thread; ``peak - baseline`` is the
    increase during a block."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.002) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = self.peak = 0

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval_s)


def build_model(layers: int, width: int) -> nn.Module:
    """Return a seeded float32 stack of ``layers`` Linear(width, width) layers."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def naive_summaries(model: nn.Module) -> list[tuple[float, ...]]:
    """Whole-tensor float64 statistics: one full float64 copy of each tensor at a time."""
    out: list[tuple[float, ...]] = []
    for tensor in model.state_dict().values():
        x = tensor.double()
        out.append(
            (float(x.mean()), float(x.std()), float(x.min()), float(x.max()), float(x.norm()))
        )
    return out


def measure(fn: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Time ``fn`` ``repeats`` times, recording RSS growth and the ru_maxrss high-water mark."""
    times, increases = [], []
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(repeats):
        gc.collect()
        with PeakRss() as rss:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        increases.append((rss.peak - rss.baseline) / MIB)
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": times,
        "seconds_min": min(times),
        "seconds_median": statistics.median(times),
        "peak_rss_increase_mib": max(increases),
        "ru_maxrss_growth_mib": (maxrss_after - maxrss_before) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    """Build the model, run both variants, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--width", type=int, default=3162, help="10 x 3162^2 ~ 100M parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-naive", action="store_true", help="skip the whole-tensor variant")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = build_model(args.layers, args.width)
    build_s = time.perf_counter() - start
    sizes = totals(model)
    elements = sizes.parameters + sizes.buffer_elements

    runs = {
        "tensor_summaries (chunked)": measure(lambda: tensor_summaries(model, "all"), args.repeats)
    }
    if not args.skip_naive:
        runs["naive whole-tensor float64"] = measure(lambda: naive_summaries(model), args.repeats)

    mib = sizes.parameter_bytes / MIB
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) float32, ", end="")
    print(f"{sizes.parameters:,} parameters, {mib:,.0f} MiB (built in {build_s:.1f} s)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ", end="")
    print(f"chunk {DEFAULT_CHUNK_ELEMENTS:,} elements, {args.repeats} repeats")
    header = ("variant", "min s", "median s", "M elem/s", "peak RSS +MiB", "ru_maxrss +MiB")
    print("{:<28} {:>7} {:>9} {:>9} {:>14} {:>15}".format(*header))
    for name, run in runs.items():
        rate = elements / run["seconds_min"] / 1e6
        print(
            f"{name:<28} {run['seconds_min']:>7.2f} {run['seconds_median']:>9.2f} {rate:>9.0f} "
            f"{run['peak_rss_increase_mib']:>14.1f} {run['ru_maxrss_growth_mib']:>15.1f}"
        )

    report = {
        "model": {"layers": args.layers, "width": args.width, **sizes.to_dict()},
        "build_seconds": build_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": psutil.cpu_count(),
        "machine": platform.machine(),
        "chunk_elements": DEFAULT_CHUNK_ELEMENTS,
        "repeats": args.repeats,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
