"""The benchmark's report: the table rows, the target checks, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import grpc

from bench.models import BenchModel

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


def write_report(report: dict[str, Any], out: Path) -> None:
    """Add the machine's description to ``report`` and write it to ``out`` as JSON."""
    report["environment"] = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
