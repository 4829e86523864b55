"""The ASGI application Envoy runs (through pyvoy): gRPC and KServe V2 REST on one port.

Envoy terminates HTTP/2 (and TLS) in compiled code and hands each request to this
application on one Python event loop. A request whose content type is
`application/grpc*` goes to the gRPC codec, anything else to the V2 REST routes; both are
codecs over the same `Core`. The ASGI lifespan builds the core (and loads what loads at
start) before Envoy opens its listener, and closes it when Envoy stops.

The launcher (`frontends/envoy.py`) passes the settings as a JSON file named by
`MODULESERVE_FRONTEND_SETTINGS`, and learns how start-up went from the JSON file named by
`MODULESERVE_FRONTEND_STATE` (the metrics port, or the one-sentence error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from moduleserve.server.frontends.envoy import (
    DRAIN_FILE_ENV,
    DRAIN_POLL_S,
    LOG_FD_ENV,
    SETTINGS_ENV,
    STATE_ENV,
)
from moduleserve.server.frontends.grpc_codec import (
    GrpcCodec,
    HandlerTable,
    Receive,
    Scope,
    Send,
    is_grpc,
)
from moduleserve.server.frontends.rest_http import dumps, send_response

logger = logging.getLogger(__name__)


class ServerApplication:
    """The whole server as one ASGI application (built empty; lifespan startup fills it)."""

    def __init__(self) -> None:
        self._grpc: GrpcCodec | None = None
        self._rest: Any = None
        self._core: Any = None
        self._metrics: Any = None
        self._drain_watch: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self._grpc is None or self._rest is None:  # lifespan off: nothing to serve
                raise RuntimeError("the server was not started (ASGI lifespan is required)")
            if is_grpc(scope):
                await self._grpc(scope, receive, send)
            elif self._grpc.refusing:
                await send_response(send, 503, dumps({"error": self._grpc.refusing}))
            else:
                await self._rest(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:  # a sentence for the launcher; details in the log
                    logger.debug("start-up failed", exc_info=exc)
                    _report({"error": str(exc) or type(exc).__name__})
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> None:
        # Imported here, not at module level: Envoy imports this module while it parses
        # its configuration, and torch's import belongs to start-up, under its error report.
        from moduleserve.server.app import log_registry, start_metrics
        from moduleserve.server.config import ServerSettings
        from moduleserve.server.core import Core
        from moduleserve.server.frontends.rest import RestApp
        from moduleserve.server.logs import configure_logging

        settings_file = Path(os.environ[SETTINGS_ENV])
        settings = ServerSettings.model_validate_json(settings_file.read_text())
        settings_file.unlink(missing_ok=True)  # it may hold tokens: gone once read
        fd = os.environ.get(LOG_FD_ENV)
        stream = os.fdopen(int(fd), "w", buffering=1) if fd else None
        configure_logging(settings.log_level, settings.log_format, stream)
        log_registry(settings)
        core = self._core = Core(settings)
        await core.check()
        table = HandlerTable()
        core.add_services(table)
        limit = settings.max_message_mb * 1024 * 1024
        self._metrics, metrics_port = await start_metrics(settings, core.cache)
        await core.start()
        self._grpc = GrpcCodec(table, limit)
        drain_file = os.environ.get(DRAIN_FILE_ENV)
        if drain_file:
            self._drain_watch = asyncio.create_task(self._on_drain(Path(drain_file)))
        self._rest = RestApp(core.plane, core.auth, limit)
        models = await asyncio.to_thread(core.registry.checkpoints.list_models)
        _report(
            {
                "metrics_port": metrics_port,
                "device": str(core.device),
                "models": [m.name for m in models],
            }
        )

    async def _on_drain(self, drain_file: Path) -> None:
        """Once the supervisor creates the drain file: refuse new calls (UNAVAILABLE, 503),
        report not ready and end watch streams; in-flight calls finish."""
        while not drain_file.exists():
            await asyncio.sleep(DRAIN_POLL_S)
        assert self._grpc is not None
        self._grpc.refusing = "the server is shutting down; retry on another"
        await self._core.begin_shutdown()

    async def _stop(self) -> None:
        if self._drain_watch is not None:
            self._drain_watch.cancel()
        if self._core is not None:
            await self._core.begin_shutdown()
            await self._core.close()
        if self._metrics is not None:
            await self._metrics.close()


def _report(state: dict[str, Any]) -> None:
    path = os.environ.get(STATE_ENV)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)  # the launcher never reads half a file


app = ServerApplication()
