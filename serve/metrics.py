"""Prometheus metrics of one HTTP worker under TGI's names (`tgi_request_count`, `tgi_request_duration`, ...).

Counters are written by hand because TGI's exporter names them without prometheus-client's `_total`
suffix; histograms and gauges use prometheus-client on a registry of this app alone.
"""
from __future__ import annotations

import threading
from collections import defaultdict

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

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
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

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
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting in the engine", registry=self.registry)
        self.batch_size = Gauge("tgi_batch_current_size", "Requests running in the engine", registry=self.registry)
        self.free_blocks = Gauge("tgi_kv_cache_free_blocks", "Free KV cache blocks", registry=self.registry)
        self.in_flight = Gauge("tgi_request_in_flight", "Requests this worker is serving", registry=self.registry)

    def count(self, name: str, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + 1.0

    def counter_value(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self, heartbeat=None) -> bytes:
        """The exposition text; engine gauges come from the latest heartbeat when there is one."""
        if heartbeat is not None:
            self.queue_size.set(heartbeat.num_waiting)
            self.batch_size.set(heartbeat.num_running)
            self.free_blocks.set(heartbeat.num_free_blocks)
        lines: list[str] = []
        with self._lock:
            for name, doc in _COUNTERS.items():
                lines.append(f"# HELP {name} {doc}")
                lines.append(f"# TYPE {name} counter")
                series = self._counters.get(name, {})
                if name == "tgi_request_failure":
                    series = {(("err", kind),): 0.0 for kind in FAILURE_KINDS} | series
                elif not series:
                    series = {(): 0.0}
                for key, value in series.items():
                    label_text = ",".join(f'{k}="{v}"' for k, v in key)
                    lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")
        return ("\n".join(lines) + "\n").encode() + generate_latest(self.registry)
