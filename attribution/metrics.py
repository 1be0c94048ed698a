"""Prometheus metrics of attribution (engine replicas) and of trace shipping (the supervisor).

Attribution metrics are created on first use, in the process that attributes; the shipping
collector reads the outbox and the shipper when Prometheus scrapes, so its gauges are never stale.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

if TYPE_CHECKING:
    from attribution.shipper import TraceShipper

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PER_TOKEN_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
SHIPPER_ACKS = {"accepted": "shipped", "duplicate": "duplicates", "conflict": "conflicts", "rejected": "rejected"}
FRACTION_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class AttributionMetrics:
    """How long attribution takes, how much of each response it attributes, and how far behind it is
    (the lag policy of attribution/service.py)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.seconds = Histogram("gateway_attribution_seconds", "Attributing one response (all its tokens).",
                                 buckets=REQUEST_BUCKETS, registry=registry)
        self.per_token = Histogram("gateway_attribution_per_token_seconds",
                                   "Attribution time of a response divided by its completion tokens.",
                                   buckets=PER_TOKEN_BUCKETS, registry=registry)
        self.fraction = Histogram("gateway_attributed_fraction",
                                  "Share of a response's tokens attributed to contributions (0..1).",
                                  buckets=FRACTION_BUCKETS, registry=registry)
        self.lag = Histogram("gateway_attribution_lag_seconds",
                             "From a response's end to its trace written (outbox and trace file).",
                             buckets=LAG_BUCKETS, registry=registry)
        self.queue_depth = Gauge("gateway_attribution_queue_depth",
                                 "Responses held in memory waiting for attribution or being attributed.",
                                 registry=registry)
        self.deferred = Gauge("gateway_attribution_deferred",
                              "Responses whose attribution waits in the usage log (attribution is behind).",
                              registry=registry)
        self.shed = Counter("gateway_attribution_shed",
                            "Responses billed with every token unattributed because attribution was too far behind.",
                            registry=registry)

    def observe(self, seconds: float, completion_tokens: int, attributed_fraction: float) -> None:
        self.seconds.observe(seconds)
        if completion_tokens > 0:
            self.per_token.observe(seconds / completion_tokens)
            self.fraction.observe(attributed_fraction)


@functools.cache
def attribution_metrics() -> AttributionMetrics:
    return AttributionMetrics()


class ShippingCollector(Collector):
    """Outbox depth and age (a directory scan per scrape) and the shipper's counters."""

    def __init__(self, shipper: TraceShipper) -> None:
        self.shipper = shipper

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.shipper.stats()
        if stats["standby"]:  # another process ships this outbox and reports its backlog
            return
        depth, oldest_age = self.shipper.outbox.backlog()  # one directory scan per scrape
        yield GaugeMetricFamily("gateway_outbox_traces", "Traces waiting in the outbox for the ledger.", value=depth)
        yield GaugeMetricFamily("gateway_outbox_oldest_age_seconds", "Age of the oldest trace waiting to be shipped.",
                                value=oldest_age)
        shipped = CounterMetricFamily("gateway_traces_shipped", "Traces the ledger acknowledged, by its answer.",
                                      labels=["ack"])
        for ack, counter in SHIPPER_ACKS.items():
            shipped.add_metric([ack], stats[counter])
        yield shipped
        yield CounterMetricFamily("gateway_trace_send_failures", "Failed attempts to stream traces to the ledger.",
                                  value=stats["send_failures"])
