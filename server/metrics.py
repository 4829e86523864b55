"""Prometheus metrics, read from the engine's own counters at scrape time (no hot-path cost)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.cache import ModelCache


class EngineCollector(Collector):
    """Per loaded model: requests, rows, batches, queue and compute time, batch sizes, memory."""

    def __init__(self, cache: ModelCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from a snapshot of every batcher's statistics."""
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "moduleserve_requests", "Inference requests by outcome", labels=[*labels, "outcome"]
        )
        rows = CounterMetricFamily("moduleserve_inference_rows", "Rows computed", labels=labels)
        batches = CounterMetricFamily("moduleserve_batches", "Forward passes", labels=labels)
        queue = CounterMetricFamily(
            "moduleserve_queue_seconds", "Time computed requests waited in the queue", labels=labels
        )
        latency = CounterMetricFamily(
            "moduleserve_request_seconds",
            "Queue + compute time of successful requests",
            labels=labels,
        )
        compute = CounterMetricFamily(
            "moduleserve_compute_seconds", "Time in forward()", labels=labels
        )
        mean_batch = GaugeMetricFamily(
            "moduleserve_mean_batch_size", "Rows per forward pass", labels=labels
        )
        queued = GaugeMetricFamily(
            "moduleserve_queued_requests", "Requests waiting now", labels=labels
        )
        memory = GaugeMetricFamily(
            "moduleserve_model_bytes", "Weights held in memory", labels=labels
        )
        loaded_models = self._cache.loaded()
        for model in loaded_models:
            key = [model.name, str(model.version.version)]
            s = model.batcher.stats()
            for outcome, count in (
                ("success", s.success),
                ("fail", s.fail),
                ("rejected", s.rejected),
                ("cancelled", s.cancelled),
            ):
                requests.add_metric([*key, outcome], count)
            rows.add_metric(key, s.rows)
            batches.add_metric(key, s.batches)
            queue.add_metric(key, s.queue_ns / 1e9)
            latency.add_metric(key, s.success_ns / 1e9)
            compute.add_metric(key, s.compute_infer_ns / 1e9)
            mean_batch.add_metric(key, s.rows / s.batches if s.batches else 0.0)
            queued.add_metric(key, s.queued)
            memory.add_metric(key, model.nbytes)
        count = GaugeMetricFamily("moduleserve_loaded_models", "Models in memory")
        count.add_metric([], len(loaded_models))
        yield from (
            requests,
            rows,
            batches,
            queue,
            latency,
            compute,
            mean_batch,
            queued,
            memory,
            count,
        )
