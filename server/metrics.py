"""Prometheus metrics, read from the engine's own counters at scrape time (no hot-path cost),
served over HTTP from the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from moduleserve.server.engine.batcher import DURATION_BUCKETS_S, BatcherStats
from moduleserve.server.engine.cache import ModelCache

LABELS = ["model", "version"]
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds of the batch-size histogram (rows per forward pass)."""


class EngineCollector(Collector):
    """Per model version served since start: requests, rows, batches, latency, queue and
    compute time, batch sizes; per loaded version: queue length and memory.

    Names follow Triton's `nv_inference_*` metrics in Prometheus base units (seconds), with
    Triton's `model` and `version` labels. Counts come from `ModelCache.ledger`, so a version
    keeps its series, never lower, after an unload or an alias swap.
    """

    def __init__(self, cache: ModelCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from a snapshot of every version's statistics."""
        totals = sorted(self._cache.ledger.totals().items())
        yield from _counters(totals)
        yield from _histograms(totals)
        queued = GaugeMetricFamily(
            "moduleserve_queued_requests", "Requests waiting now", labels=LABELS
        )
        for (name, version), stats in totals:
            queued.add_metric([name, str(version)], stats.queued)
        memory = GaugeMetricFamily(
            "moduleserve_model_bytes", "Weights held in memory", labels=LABELS
        )
        loaded = self._cache.loaded()
        for model in loaded:
            memory.add_metric([model.name, str(model.version.version)], model.nbytes)
        count = GaugeMetricFamily("moduleserve_loaded_models", "Models in memory")
        count.add_metric([], len(loaded))
        yield from (queued, memory, count)


Totals = list[tuple[tuple[str, int], BatcherStats]]


def _counters(totals: Totals) -> Iterator[Metric]:
    """Requests by outcome (Triton's request_success/failure), rows and forward passes."""
    requests = CounterMetricFamily(
        "moduleserve_requests", "Inference requests by outcome", labels=[*LABELS, "outcome"]
    )
    rows = CounterMetricFamily("moduleserve_inference_rows", "Rows computed", labels=LABELS)
    batches = CounterMetricFamily("moduleserve_batches", "Forward passes", labels=LABELS)
    for (name, version), s in totals:
        key = [name, str(version)]
        for outcome, count in (
            ("success", s.success),
            ("fail", s.fail),
            ("rejected", s.rejected),
            ("cancelled", s.cancelled),
        ):
            requests.add_metric([*key, outcome], count)
        rows.add_metric(key, s.rows)
        batches.add_metric(key, s.batches)
    yield from (requests, rows, batches)


def _histograms(totals: Totals) -> Iterator[Metric]:
    """Latency, queue and compute time, and rows per forward pass, as histograms."""
    request = HistogramMetricFamily(
        "moduleserve_request_duration_seconds",
        "Queue + compute time of each successful request",
        labels=LABELS,
    )
    queue = HistogramMetricFamily(
        "moduleserve_queue_duration_seconds",
        "Time each successful request waited in the queue",
        labels=LABELS,
    )
    compute = HistogramMetricFamily(
        "moduleserve_compute_duration_seconds", "Time in forward() per forward pass", labels=LABELS
    )
    batch = HistogramMetricFamily(
        "moduleserve_batch_size", "Rows per successful forward pass", labels=LABELS
    )
    for (name, version), s in totals:
        key = [name, str(version)]
        request.add_metric(key, _cumulative(s.request_buckets), s.success_ns / 1e9)
        queue.add_metric(key, _cumulative(s.queue_buckets), s.queue_ns / 1e9)
        compute.add_metric(key, _cumulative(s.compute_buckets), s.compute_infer_ns / 1e9)
        batch.add_metric(key, _batch_size_buckets(s.batch_sizes), s.rows)
    yield from (request, queue, compute, batch)


def _cumulative(observations: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (DURATION_BUCKETS_S, then the rest) as Prometheus `le` buckets."""
    running = list(itertools.accumulate(observations))
    bounds = [floatToGoString(bound) for bound in DURATION_BUCKETS_S] + ["+Inf"]
    return list(zip(bounds, running, strict=True))


def _batch_size_buckets(batch_sizes: Mapping[int, int]) -> list[tuple[str, float]]:
    """Forward passes by rows as Prometheus `le` buckets."""
    buckets: list[tuple[str, float]] = [
        (floatToGoString(bound), sum(n for size, n in batch_sizes.items() if size <= bound))
        for bound in BATCH_SIZE_BUCKETS
    ]
    return [*buckets, ("+Inf", sum(batch_sizes.values()))]


IDLE_TIMEOUT_S = 5.0
"""How long an open connection may wait before its next request starts (keep-alive)."""

HEAD_TIMEOUT_S = 5.0
"""How long a request head may take to arrive once its first byte has."""

WRITE_TIMEOUT_S = 10.0
"""How long a client may take to read its answer."""

MAX_REQUEST_HEAD = 16 * 1024
"""Largest request line plus headers accepted; a scrape sends a few hundred bytes."""

METRICS_PATHS = ("/metrics", "/")

MAX_CONNECTIONS = 64
"""Open connections at most (the gRPC server needs descriptors too). At the cap a new
connection still gets in: the one that has waited longest for a request is closed."""


class MetricsServer:
    """`GET /metrics` over HTTP on the running event loop.

    prometheus_client's own server starts a thread per connection, so every idle connection
    held one; here an idle connection is a suspended coroutine. Idle connections cannot
    lock a scraper out: each waits IDLE_TIMEOUT_S at most for its next request (and
    HEAD_TIMEOUT_S for the rest of it), and when MAX_CONNECTIONS are open a newcomer
    takes the place of the connection that has waited longest, never of one being answered.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        head_timeout_s: float = HEAD_TIMEOUT_S,
    ) -> None:
        self._registry = registry
        self._idle_timeout_s, self._head_timeout_s = idle_timeout_s, head_timeout_s
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # counted against MAX_CONNECTIONS
        self._tasks: set[asyncio.Task[None]] = set()  # every handler, closed ones' too
        # Connections waiting for a request, longest-waiting first (a dict keeps order).
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the port. OSError when the port cannot be bound."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening, drop every open connection and wait for their handlers."""
        if self._server is not None:
            self._server.close()
        # Aborted, not cancelled: each handler then ends on its own (a cancelled one makes
        # asyncio's stream callback log an error), even one blocked writing to a client.
        for writer in self._open:
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until the client closes it, errs or idles."""
        task = asyncio.current_task()
        at_cap = len(self._open) >= MAX_CONNECTIONS
        if task is None or (at_cap and not self._close_longest_idle()):
            writer.close()  # every open connection is being answered right now
            return
        self._open.add(writer)
        self._tasks.add(task)
        try:
            keep_alive = True
            while keep_alive:
                self._waiting[writer] = None  # the newest waiter, last to be closed
                head = await self._read_head(reader)
                if writer.is_closing():
                    break  # closed for a newcomer just as its request arrived
                del self._waiting[writer]
                response, keep_alive = _respond(head.decode("latin-1"), self._registry)
                writer.write(response)
                # A client that never reads its answers does not hold the connection either.
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # idle too long, closed mid-request, or a head too large: just close
        except ConnectionError:
            pass
        finally:
            self._waiting.pop(writer, None)
            self._open.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        """The next request head: its first byte within the idle timeout, the rest within
        the head timeout (a client trickling bytes cannot hold the connection either)."""
        first = await asyncio.wait_for(reader.readexactly(1), self._idle_timeout_s)
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._head_timeout_s)
        return first + rest

    def _close_longest_idle(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        oldest = next(iter(self._waiting), None)
        if oldest is None:
            return False
        del self._waiting[oldest]
        self._open.discard(oldest)  # its handler ends on its own when it sees the close
        oldest.close()
        return True


def _respond(head: str, registry: CollectorRegistry) -> tuple[bytes, bool]:
    """The response to one request head, and whether the connection stays open."""
    request_line, *header_lines = head.split("\r\n")
    parts = request_line.split(" ")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n", "text/plain", False), False
    method, target, version = parts
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
    if method not in ("GET", "HEAD") or "content-length" in headers:
        # A body would have to be read before the next request: close instead.
        return _response("405 Method Not Allowed", b"GET only\n", "text/plain", False), False
    if target.split("?", 1)[0] not in METRICS_PATHS:
        return _response("404 Not Found", b"see /metrics\n", "text/plain", keep_alive), keep_alive
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    body = encoder(registry)
    response = _response("200 OK", body, content_type, keep_alive, head_only=method == "HEAD")
    return response, keep_alive


def _response(
    status: str, body: bytes, content_type: str, keep_alive: bool, head_only: bool = False
) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)
