"""Prometheus metrics under TGI's names (`tgi_request_count`, `tgi_request_duration`, ...), for every HTTP worker.

Several gunicorn workers answer `/metrics` in turn, so the values live in prometheus-client's multiprocess
files (PROMETHEUS_MULTIPROC_DIR, set by the launcher) and any worker's reply sums them all: counters and
histograms over every worker that ever ran, in-flight requests over live ones, engine gauges from the latest
heartbeat any worker saw. Without the variable (an app in a test) the values are this process's own.
TGI's counters have no `_total` suffix, which prometheus-client's Counter always adds: they are stored as
summed gauges and declared `counter` in the exposition.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest, multiprocess

from model_handler import envs

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
FAILURE_KINDS = ("validation", "overloaded", "generation", "incomplete", "template")

_COUNTERS = {
    "tgi_request_count": "Generation requests received",
    "tgi_request_success": "Generation requests that completed",
    "tgi_request_failure": "Generation requests that failed, by error kind",
}


class Metrics:
    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()
        # prometheus-client chose its value storage when it was imported, from this same variable.
        self.multiprocess_dir = envs.PROMETHEUS_MULTIPROC_DIR
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = {
            name: Gauge(
                name,
                doc,
                ["err"] if name == "tgi_request_failure" else [],
                registry=self.registry,
                multiprocess_mode="sum",
            )
            for name, doc in _COUNTERS.items()
        }
        for kind in FAILURE_KINDS:
            self._counters["tgi_request_failure"].labels(err=kind).inc(0)  # every kind shows, at 0 until it happens

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, registry=self.registry, buckets=buckets)

        self.duration = hist("tgi_request_duration", "End-to-end request time (s)", _DURATION_BUCKETS)
        self.validation_duration = hist(
            "tgi_request_validation_duration", "Parsing, templating and tokenizing time (s)", _DURATION_BUCKETS
        )
        self.queue_duration = hist(
            "tgi_request_queue_duration", "Submit to first token time (s): queue and prefill", _DURATION_BUCKETS
        )
        self.inference_duration = hist(
            "tgi_request_inference_duration", "First to last token time (s)", _DURATION_BUCKETS
        )
        self.time_per_token = hist(
            "tgi_request_mean_time_per_token_duration", "Mean time per generated token (s)", _DURATION_BUCKETS
        )
        self.generated_tokens = hist("tgi_request_generated_tokens", "Generated tokens per request", _TOKEN_BUCKETS)
        self.input_length = hist("tgi_request_input_length", "Prompt tokens per request", _TOKEN_BUCKETS)
        self.max_new_tokens = hist("tgi_request_max_new_tokens", "Requested max new tokens", _TOKEN_BUCKETS)

        def engine_gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=self.registry, multiprocess_mode="mostrecent")

        self.queue_size = engine_gauge("tgi_queue_size", "Requests waiting in the engine")
        self.batch_size = engine_gauge("tgi_batch_current_size", "Requests running in the engine")
        self.free_blocks = engine_gauge("tgi_kv_cache_free_blocks", "Free KV cache blocks")
        self.in_flight = Gauge(
            "tgi_request_in_flight",
            "Requests the HTTP workers are serving",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def count(self, name: str, **labels: str) -> None:
        gauge = self._counters[name]
        (gauge.labels(**labels) if labels else gauge).inc()

    def render(self, heartbeat=None) -> bytes:
        """The exposition text; engine gauges come from the latest heartbeat when there is one."""
        if heartbeat is not None:
            self.queue_size.set(heartbeat.num_waiting)
            self.batch_size.set(heartbeat.num_running)
            self.free_blocks.set(heartbeat.num_free_blocks)
        registry = self.registry
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        text = generate_latest(registry)
        for name in _COUNTERS:
            text = text.replace(f"# TYPE {name} gauge\n".encode(), f"# TYPE {name} counter\n".encode())
        return text


def mark_worker_dead(pid: int) -> None:
    """Drop a gone worker's live gauges (its in-flight count); its counters and histograms still sum."""
    if envs.PROMETHEUS_MULTIPROC_DIR:
        multiprocess.mark_process_dead(pid)
