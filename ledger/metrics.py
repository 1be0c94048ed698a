"""Prometheus metrics of the ledger service: trace ingestion and the state of settlement.

Ingestion is counted as it happens. Settlement is read from the database when Prometheus scrapes
(cached for a few seconds), so batches settled by `gateway settle` or by the gateway's periodic
settler are all seen, whichever process drove them.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
from sqlmodel import Session, func, select

from ledger.models import PayoutBatch
from ledger.settlement.payouts import CONFIRMED, PAID, PLANNED, SENT, SIGNED, VOIDED

if TYPE_CHECKING:
    from ledger.journal.journal import Journal

INGEST_RESULTS = ("accepted", "duplicate", "conflict", "rejected")
BATCH_STATES = (PLANNED, SIGNED, SENT, CONFIRMED, PAID, VOIDED)
AMOUNT_STATES = ("payable", "pending", "paid")
TOKEN_BASE_UNITS = 10**18  # the payout token has 18 decimals
CACHE_SECONDS = 10.0
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class IngestMetrics:
    """Traces ingested by result, and the time to post one ingest message."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.traces = Counter("ledger_traces_ingested_total", "Traces received, by the ledger's answer.", ["result"],
                              registry=registry)
        self.batch_seconds = Histogram("ledger_ingest_batch_seconds", "Posting one ingest message (its traces).",
                                       buckets=INGEST_BUCKETS, registry=registry)
        for result in INGEST_RESULTS:
            self.traces.labels(result)


@functools.cache
def ingest_metrics() -> IngestMetrics:
    return IngestMetrics()


class SettlementCollector(Collector):
    """Payout batches by state, amounts owed / in flight / paid, and gas spent on paid batches."""

    def __init__(self, journal: Journal, cache_seconds: float = CACHE_SECONDS) -> None:
        self.journal = journal
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[GaugeMetricFamily | CounterMetricFamily]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, self._read())
            yield from self._cached[1]

    def _read(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        with Session(self.journal.engine) as session:
            counts = dict(session.exec(select(PayoutBatch.state, func.count()).group_by(PayoutBatch.state)).all())
            gas = session.exec(select(func.coalesce(func.sum(PayoutBatch.gas_used), 0))
                               .where(PayoutBatch.state == PAID)).one()
        sums = self.journal.sums_by_class()
        batches = GaugeMetricFamily("ledger_payout_batches", "Payout batches in each settlement state.",
                                    labels=["state"])
        for state in BATCH_STATES:
            batches.add_metric([state], counts.get(state, 0))
        amounts = GaugeMetricFamily("ledger_payout_amount_tokens",
                                    "Rewards owed (payable), in an unconfirmed batch (pending) and paid, in tokens.",
                                    labels=["state"])
        for state in AMOUNT_STATES:
            amounts.add_metric([state], sums.get(state, 0) / TOKEN_BASE_UNITS)
        gas_used = CounterMetricFamily("ledger_settlement_gas_used", "Gas used by the transactions of paid batches.",
                                       value=int(gas))
        return [batches, amounts, gas_used]
