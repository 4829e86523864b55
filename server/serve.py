"""`serve`: run the chosen front end until SIGINT/SIGTERM, then stop gracefully.

Kept light (no torch import) because under Envoy this process only supervises: Envoy
holds the models, and job workers are this process's children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from moduleserve.server.config import ServerSettings
from moduleserve.server.workers import check_port_free

logger = logging.getLogger(__name__)


def chosen_front_end(settings: ServerSettings) -> str:
    """`envoy` or `grpc`: `auto` takes Envoy wherever its wheel installed."""
    if settings.frontend != "auto":
        return settings.frontend
    from moduleserve.server.frontends.envoy import envoy_available

    if envoy_available():
        return "envoy"
    logger.warning("Envoy (pyvoy) is not installed on this platform: serving with grpc.aio")
    return "grpc"


async def serve(
    settings: ServerSettings,
    port_file: Path | None = None,
    workers: int = 1,
    argv: Sequence[str] = (),
    join_port: bool = False,
) -> None:
    """Serve until SIGINT/SIGTERM with `workers` processes on the port."""
    if chosen_front_end(settings) == "grpc" or join_port:
        from moduleserve.server.app import serve_grpc

        await serve_grpc(settings, port_file, workers, argv, join_port)
    else:
        await serve_envoy(settings, port_file, workers)


async def serve_envoy(settings: ServerSettings, port_file: Path | None, workers: int) -> None:
    """Envoy processes serving the app, this process supervising them and the job workers."""
    from moduleserve.server.frontends.envoy import EnvoyFrontEnd
    from moduleserve.server.jobs.supervisor import WorkerProcesses

    check_port_free(settings.host, settings.grpc_port, "--grpc-port")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    front = EnvoyFrontEnd(settings, workers)
    job_workers = WorkerProcesses(settings, settings.job_workers)
    codes: list[int] = []
    try:
        port = await front.start()
        if settings.job_workers:
            job_workers.start()
        if port_file is not None:
            write_port_file(port_file, port)
        models = list(front.state.get("models", []))
        print(banner(settings, port, front.metrics_port, models), flush=True)
        logger.info(
            "serving on %s:%d with Envoy (%d process%s, device %s)",
            settings.host,
            port,
            workers,
            "" if workers == 1 else "es",
            front.device,
        )
        while not stop.is_set() and not front.exited():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        crashed = front.exited()
        if crashed:
            raise RuntimeError(crashed)
        logger.info(
            "shutting down: finishing in-flight requests (grace %.1fs)", settings.shutdown_grace_s
        )
    finally:
        codes = await front.stop()
        await job_workers.stop()
    if any(codes):
        raise RuntimeError(f"Envoy processes exited with {codes}")
    logger.info("stopped")


def write_port_file(port_file: Path, port: int) -> None:
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)  # readers never see a half-written number


def banner(settings: ServerSettings, port: int, metrics_port: int, models: list[str]) -> str:
    target = f"{settings.host}:{port}"
    metrics = f"http://{settings.host}:{metrics_port}/metrics" if metrics_port else "off"
    # A model this registry has (the demo's mynet when it is there), not one it may lack.
    example = "mynet" if "mynet" in models else (models[0] if models else None)
    infer = (
        f"  moduleserve --target {target} infer {example} --random\n"
        if example
        else "  (no models yet: moduleserve-registry push NAME FILE --class CLASS)\n"
    )
    return (
        f"moduleserve serving on {target} (metrics: {metrics}); try:\n"
        f"  moduleserve --target {target} models\n{infer}"
        "Ctrl-C stops it."
    )
