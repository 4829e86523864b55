"""`moduleserve-server`: run the gRPC server (flags override MODULESERVE_* variables)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moduleserve.client.version import version_text
from moduleserve.registry.config import with_added
from moduleserve.server.config import BatchingSettings, ServerSettings, settings_error_text
from moduleserve.server.logs import configure_logging
from moduleserve.server.serve import serve
from moduleserve.server.workers import JOIN_FLAG

logger = logging.getLogger(__name__)

BATCHING_FLAGS = ("max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "max_queue_size")


def build_parser() -> argparse.ArgumentParser:
    """Every option; each also reads from a MODULESERVE_<NAME> environment variable."""
    p = argparse.ArgumentParser(
        prog="moduleserve-server",
        description="Serve registered PyTorch models over gRPC (Open Inference Protocol). "
        "Every option can also come from MODULESERVE_<OPTION> in the environment.",
    )
    add = p.add_argument
    add("--version", action="version", version=version_text())
    add(
        "--frontend",
        choices=["auto", "envoy", "grpc"],
        help="envoy: gRPC and KServe V2 REST on one port; grpc: grpc.aio, gRPC only "
        "(default auto: envoy when installed)",
    )
    add("--host", help="listen address (default 127.0.0.1)")
    add("--grpc-port", type=int, help="gRPC port (default 8001; 0 picks a free one)")
    add("--metrics-port", type=int, help="Prometheus port (default 8002; 0 picks a free one)")
    add("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    add("--port-file", type=Path, help="write the bound gRPC port to this file once serving")
    add(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port via SO_REUSEPORT (default 1)",
    )
    # Set by the first process on the workers it starts: the port is their parent's.
    add(JOIN_FLAG, action="store_true", dest="join_port", help=argparse.SUPPRESS)
    add("--db", help="registry database URL (default: sqlite file beside the store)")
    add("--store", type=Path, help="registry blob store folder (default ./data/store)")
    add(
        "--allow-prefix",
        action="append",
        dest="allowed_class_prefixes",
        metavar="PACKAGE",
        help="package whose Module classes may be loaded, besides moduleserve.registry.demo "
        "(repeatable)",
    )
    add(
        "--class-path",
        action="append",
        type=Path,
        dest="class_path",
        metavar="DIR",
        help="folder to import your classes' package from (repeatable)",
    )
    add("--device", help="auto (default), cpu, cuda or cuda:N")
    add("--dtype", choices=["float32", "float16", "bfloat16"], help="inference precision")
    add(
        "--compute",
        choices=["auto", "inline", "thread"],
        help="where forward passes run: auto (default: inline when measured under 1 ms), "
        "inline on the event loop, or a compute thread",
    )
    add(
        "--torch-threads",
        type=int,
        help="intra-op threads of forward passes (default: half the cores)",
    )
    add("--max-batch-size", type=int, help="rows per forward pass (default 32)")
    add(
        "--max-queue-delay-ms",
        type=float,
        help="longest a batch waits for more requests under load (default 2)",
    )
    add("--preferred-batch-sizes", type=_int_list, metavar="N,N,...")
    add("--max-queue-size", type=int, help="waiting requests per model (default 1024)")
    add(
        "--model-batching",
        type=json.loads,
        metavar="JSON",
        help='per-model batching, e.g. \'{"mlp": {"max_batch_size": 64}}\'',
    )
    add("--memory-budget-mb", type=float, help="weights kept loaded (default 4096)")
    add(
        "--load",
        action="append",
        metavar="MODEL[:REF]",
        help="load and warm up this model before reporting ready (repeatable; REF: a version "
        "or alias, default: the default alias, else the latest)",
    )
    add(
        "--load-all",
        action="store_true",
        default=None,
        help="load every model of the registry (at its default version) before reporting ready",
    )
    # The former name of --load, kept for one release (a warning says so).
    add("--preload", action="append", help=argparse.SUPPRESS)
    add(
        "--lazy-load",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load a model on its first request (default); with --no-lazy-load only "
        "`moduleserve load`, --load and --load-all load models",
    )
    add("--alias-refresh-s", type=float, help="how often aliases are re-read (default 2)")
    add("--max-message-mb", type=int, help="gRPC message size limit (default 64)")
    add("--shutdown-grace-s", type=float, help="time in-flight requests get on SIGTERM")
    add(
        "--token",
        action="append",
        dest="tokens",
        help="bearer token for mutating RPCs (visible in `ps`: prefer --token-file)",
    )
    add(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file of bearer tokens for mutating RPCs, one per line (# starts a comment)",
    )
    add(
        "--read-token",
        action="append",
        dest="read_tokens",
        help="bearer token for reads: weights, registry, jobs, inference (default: none needed)",
    )
    add(
        "--read-token-file",
        type=Path,
        metavar="PATH",
        help="file of bearer tokens for reads, one per line",
    )
    add(
        "--job-workers",
        type=int,
        help="fine-tuning worker processes to start (default 1; 0: none)",
    )
    add("--job-device", help="where jobs train: auto (default), cpu, cuda or cuda:N")
    add("--job-torch-threads", type=int, help="torch threads of a training job (default 1)")
    add("--job-nice", type=int, help="CPU priority decrease of job workers (default 10)")
    add("--job-lease-s", type=float, help="lease of a running job in seconds (default 30)")
    add(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback address without tokens",
    )
    add("--tls-cert", type=Path)
    add("--tls-key", type=Path)
    add("--log-format", choices=["plain", "json"])
    add("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    return p


def settings_from(args: argparse.Namespace) -> ServerSettings:
    """Environment first, then every flag that was given."""
    flags: dict[str, Any] = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("port_file", "no_metrics", "join_port")
    }
    added = flags.pop("allowed_class_prefixes", ()), flags.pop("class_path", ())
    batching = {k: flags.pop(k) for k in BATCHING_FLAGS if k in flags}
    if args.no_metrics:
        flags["metrics_port"] = None
    if batching:
        base = ServerSettings.model_fields["batching"].get_default(call_default_factory=True)
        env_batching = _env_batching() or base
        flags["batching"] = BatchingSettings(**{**env_batching.model_dump(), **batching})
    return with_added(ServerSettings(**flags), *added)


def _env_batching() -> BatchingSettings | None:
    try:
        return ServerSettings().batching
    except ValidationError:
        return None


def check_device(setting: str) -> None:
    """Refuse a device this machine lacks. `auto` and `cpu` always exist: only a CUDA
    setting needs torch, which this process otherwise never imports under Envoy."""
    if setting not in ("auto", "cpu"):
        from moduleserve.server.engine.devices import resolve_device

        resolve_device(setting)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, then serve until SIGINT/SIGTERM."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
    except (ValidationError, ValueError) as exc:
        print(f"error: invalid settings: {settings_error_text(exc)}", file=sys.stderr)
        return 2
    try:
        check_device(settings.device)  # before anything starts: a usage error, exit 2
    except ValueError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.preload:
        logger.warning(
            "--preload (MODULESERVE_PRELOAD, preload in moduleserve.toml) is deprecated and "
            "goes away in the next release: use --load (MODULESERVE_LOAD, load)"
        )
    try:
        asyncio.run(serve(settings, args.port_file, args.workers, argv, args.join_port))
    except Exception as exc:  # start-up failures: one sentence, details in the log
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
