"""GET /metrics in Prometheus' text format (prometheus-client): requests by status, tokens, the
engine's queue and rows read at scrape time, and histograms of time to first token and decode
speed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "llava_edge"


class ServerMetrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self, engine_stats: Callable[[], dict[str, float] | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "Chat completion requests by HTTP status (a stream's is sent with its first chunk)",
            ["status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of answered requests", registry=self.registry
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens generated", registry=self.registry
        )
        self.stream_errors = Counter(
            f"{PREFIX}_stream_errors",
            "Streams that began (status 200) and ended in an error event (a timeout, say)",
            registry=self.registry,
        )
        self.disconnects = Counter(
            f"{PREFIX}_client_disconnects",
            "Requests whose client left before the answer ended",
            registry=self.registry,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From the request's arrival (before its images are fetched) to its first token",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.decode_speed = Histogram(
            f"{PREFIX}_decode_tokens_per_second",
            "Decode speed of each answer (tokens after the first)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats))

    def observe_answer(self, prompt_tokens: int, answer_tokens: int, timings: dict) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(answer_tokens)
        if "first_token_ms" in timings:
            self.ttft.observe(timings["first_token_ms"] / 1000)
        if "decode_tokens_per_s" in timings:
            self.decode_speed.observe(timings["decode_tokens_per_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's rows and queue as gauges, its running totals as counters, read per scrape."""

    GAUGES = {
        "running": "Requests decoding now (rows in use)",
        "waiting": "Requests waiting for a row (queue depth)",
        "admitting": "Requests still arriving (body, images, prompt), counted against the queue",
        "max_batch": "Rows of the batch",
        "prefix_entries": "Finished conversations whose keys/values are kept for reuse",
        "prefix_bytes": "Memory held by the prefix store",
    }
    COUNTERS = {
        "prefix_tokens_reused": "Prompt tokens whose keys/values were copied, not computed",
        "decode_steps": "Batched decoder steps",
        "decode_tokens": "Tokens of batched decoder steps (a request's first comes from prefill)",
        "decode_seconds": "Time in batched decoder steps",
        "prefill_seconds": "Time admitting requests (image features and prefill)",
        "finished": "Requests that ended with their answer",
        "cancelled": "Requests cancelled before they finished (the client gone, a time limit the "
        "server noticed first, shutdown without drain)",
        "failed": "Requests that ended in an error (a time limit the engine noticed first, a "
        "backend failure, shutdown)",
    }

    def __init__(self, stats: Callable[[], dict[str, float] | None]):
        self.stats = stats

    def collect(self) -> Iterator:
        stats = self.stats()
        if stats is None:  # still loading
            return
        for name, help_text in self.GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_engine_{name}", help_text, value=stats[name])
        for name, help_text in self.COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_engine_{name}", help_text, value=stats[name])
