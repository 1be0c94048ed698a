"""Prometheus metrics of an engine replica: requests, latencies, tokens, the adapter cache and its
dealings with the ledger.

The metrics live in the process's default registry beside vLLM's own `vllm:*` metrics, and are
created on first use so that a process which only imports this module (the supervisor) exports
none of them. Labels stay bounded: `adapter` names a registered adapter ("" for the base model),
never a name a client made up.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.registry import CollectorRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
APIS = ("completions", "chat_completions", "grpc")


class RequestMetrics:
    """Traffic and latency of generation requests, by front door (`api`)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        on = {"registry": registry}
        self.requests = Counter("gateway_requests_total", "Generation requests answered, by outcome.",
                                ["model", "adapter", "api", "status"], **on)
        self.in_flight = Gauge("gateway_requests_in_flight", "Generation requests being served.", ["api"], **on)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "From admission to the first generated token.",
                              ["api"], buckets=LATENCY_BUCKETS, **on)
        self.itl = Histogram("gateway_inter_token_latency_seconds",
                             "Time between successive generated tokens of a request.", ["api"],
                             buckets=TOKEN_GAP_BUCKETS, **on)
        self.duration = Histogram("gateway_request_duration_seconds", "From admission to the last generated token.",
                                  ["api"], buckets=LATENCY_BUCKETS, **on)
        self.prompt_tokens = Counter("gateway_prompt_tokens_total", "Prompt tokens of served requests.",
                                     ["model", "adapter"], **on)
        self.completion_tokens = Counter("gateway_completion_tokens_total", "Tokens generated.",
                                         ["model", "adapter"], **on)
        for api in APIS:
            self.in_flight.labels(api)

    def rejected(self, model: str, adapter: str, api: str, status: int) -> None:
        """A request refused before it reached the engine."""
        self.requests.labels(model, adapter, api, str(status)).inc()

    def tracker(self, model: str, adapter: str | None, api: str, prompt_tokens: int,
                started: float | None = None) -> "RequestTracker":
        """Track one admitted request; `started` is its admission time (perf_counter), default now."""
        return RequestTracker(self, model, adapter or "", api, prompt_tokens, started)


class RequestTracker:
    """Times one admitted request: call `tokens(n)` per engine step, then `finish(status)` once."""

    __slots__ = ("metrics", "labels", "api", "prompt_tokens", "started", "last", "generated", "done", "_ttft", "_itl")

    def __init__(self, metrics: RequestMetrics, model: str, adapter: str, api: str, prompt_tokens: int,
                 started: float | None = None) -> None:
        self.metrics, self.labels, self.api, self.prompt_tokens = metrics, (model, adapter), api, prompt_tokens
        self._ttft, self._itl = metrics.ttft.labels(api), metrics.itl.labels(api)
        self.started = time.perf_counter() if started is None else started
        self.last: float | None = None
        self.generated = 0
        self.done = False
        metrics.in_flight.labels(api).inc()

    def tokens(self, count: int) -> None:
        """`count` new tokens arrived now: the first step gives TTFT, each later token its share of the gap."""
        if count <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self._ttft.observe(now - self.started)
        else:
            gap = (now - self.last) / count
            for _ in range(count):
                self._itl.observe(gap)
        self.last = now
        self.generated += count

    def finish(self, status: int = 200) -> None:
        """Count the request once with its outcome (HTTP status code; 200 when it completed)."""
        if self.done:
            return
        self.done = True
        metrics = self.metrics
        metrics.in_flight.labels(self.api).dec()
        metrics.requests.labels(*self.labels, self.api, str(status)).inc()
        metrics.duration.labels(self.api).observe(time.perf_counter() - self.started)
        metrics.prompt_tokens.labels(*self.labels).inc(self.prompt_tokens)
        metrics.completion_tokens.labels(*self.labels).inc(self.generated)


class AdapterMetrics:
    """Loads, evictions, hits and residency of a replica's adapter cache."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        on = {"registry": registry}
        self.loads = Counter("gateway_adapter_loads_total", "Adapters loaded into this replica's cache.", **on)
        self.evictions = Counter("gateway_adapter_evictions_total", "Adapters evicted (least recently used).", **on)
        self.hits = Counter("gateway_adapter_cache_hits_total", "Requests whose adapter was already resident.", **on)
        self.load_seconds = Histogram("gateway_adapter_load_seconds", "Fetching and checking one adapter.",
                                      buckets=LATENCY_BUCKETS, **on)
        self.resident = Gauge("gateway_adapters_resident", "Adapters resident in this replica's cache.", **on)

    def watch_residency(self, count: Callable[[], int]) -> None:
        self.resident.set_function(count)


class LedgerDealings:
    """What a replica's credit book and rate grants see of the ledger: hold reports it refused and
    requests admitted on local rate limits while it was away."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        on = {"registry": registry}
        self.refused_holds = Counter("gateway_hold_reports_refused_total",
                                     "Request holds the ledger refused (the request is billed by its trace).", **on)
        self.local_rate_admissions = Counter(
            "gateway_rate_local_admissions_total",
            "Requests admitted on this replica's own rate limits while the ledger was away.", **on)


@functools.cache
def ledger_dealings() -> LedgerDealings:
    return LedgerDealings()


@functools.cache
def request_metrics() -> RequestMetrics:
    return RequestMetrics()


@functools.cache
def adapter_metrics() -> AdapterMetrics:
    return AdapterMetrics()
