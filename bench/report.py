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
    f"{'model':<6} {'target':<10} {'N':>3} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'batch':>6} {'srv CPU%':>8} {'us/req':>6} {'RSS MiB':>7} {'cli CPU%':>8} {'other%':>6} "
    f"{'errors':>6} {'limit':>5}"
)
# A process at this share of its core is the bottleneck of a closed-loop run.
SATURATED_PCT = 90.0


def limited_by(row: dict[str, Any]) -> str:
    """``cli`` when the load generator saturated its core (the run measured the client, not
    the server), ``srv`` when the server did, else empty."""
    if row["client_cpu_pct"] >= SATURATED_PCT:
        return "cli"
    if row["server_cpu_pct"] >= SATURATED_PCT:
        return "srv"
    return ""


def print_row(row: dict[str, Any]) -> None:
    batch = "n/a" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}"
    if row["target"].startswith("echo"):
        batch = "-"
    print(
        f"{row['model']:<6} {row['target']:<10} {row['concurrency']:>3} {row['rps']:>8.0f} "
        f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {batch:>6} {row['server_cpu_pct']:>8.0f} "
        f"{row['server_cpu_us_per_request']:>6.0f} {row['server_rss_mib']:>7.0f} "
        f"{row['client_cpu_pct']:>8.0f} {row['other_cpu_pct']:>6.0f} "
        f"{row['errors']:>6} {limited_by(row):>5}",
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
    """The issue's targets, computed from the table: each front end against its own echo
    floor (srv-grpc against echo-grpc, srv-envoy against echo-envoy)."""
    by = {(r["model"], r["target"], r["concurrency"]): r for r in rows}
    out = []
    for model in models:
        m = model.name
        for front in ("grpc", "envoy"):
            srv, floor = f"srv-{front}", f"echo-{front}"
            server, echo = by.get((m, srv, 64)), by.get((m, floor, 64))
            if server and echo:
                ratio = server["rps"] / echo["rps"]
                out.append(check(f"{m} {srv} N=64 req/s / {floor}", ratio, ">=", 0.8,
                                 f"{server['rps']:.0f} vs {echo['rps']:.0f} req/s"))  # fmt: skip
                out.append(check(f"{m} {srv} N=64 p99 ms", server["p99_ms"], "<=",
                                 2 * echo["p99_ms"],
                                 f"2 x {floor} p99 {echo['p99_ms']:.2f} ms"))  # fmt: skip
                if m == "mlp":
                    out.append(check(f"mlp {srv} N=64 mean batch", server["mean_batch"], ">=", 8,
                                     "rows/pass"))  # fmt: skip
            server, echo = by.get((m, srv, 1)), by.get((m, floor, 1))
            if server and echo:
                out.append(check(f"{m} {srv} N=1 p50 ms", server["p50_ms"], "<=",
                                 echo["p50_ms"] + 0.5,
                                 f"{floor} p50 {echo['p50_ms']:.2f} ms + 0.5"))  # fmt: skip
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
