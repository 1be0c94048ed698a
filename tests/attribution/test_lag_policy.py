"""When attribution is slower than generation: memory stays bounded and every response is billed once.

Real usage log, real outbox files, a real index; attribution is made slower than the responses arrive
by a wrapper that sleeps before the real (in-process) attribution. The ledger's lineage answer is a
fixed record for that index (the real Access path is covered in test_service.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from attribution.index_builder import IndexManifest
from attribution.metrics import AttributionMetrics
from attribution.outbox import Outbox
from attribution.search_pool import LocalAttributors
from attribution.service import METHOD, OVERLOAD_METHOD, AttributionDeferred, AttributionService, LedgerLineages, \
    usage_record
from attribution.usage_log import UsageLog
from ledger.client.access import LineageRecord
from ledger.client.trace import AttributionTrace, TokenAttribution
from tests.attribution.passages import DOCUMENTS


class SlowAttributors:
    """The real in-process attribution, `seconds` slower per call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.inner = LocalAttributors()

    def attribute(self, index_dirs: tuple[str, ...], context: Sequence[int],
                  completion: Sequence[int]) -> list[TokenAttribution]:
        time.sleep(self.seconds)
        return self.inner.attribute(index_dirs, context, completion)

    def indexes_open(self) -> int:
        return self.inner.indexes_open()

    def close(self) -> None:
        self.inner.close()


class OneLineage:
    """The ledger's lineage answer: every adapter learned from `index_dir`."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir

    def lineage(self, adapter: str) -> LineageRecord:
        return LineageRecord(index_dirs=(str(self.index_dir),))


class CountingOutbox(Outbox):
    """The real outbox, counting how often each trace id is put."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.puts: Counter[str] = Counter()

    def put(self, trace: AttributionTrace, *, admitted: bool = False) -> Path:
        self.puts[trace.trace_id] += 1
        return super().put(trace, admitted=admitted)


def wait_until(condition, seconds: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def responses(tokenize, count: int) -> list:  # type: ignore[no-untyped-def]
    texts = [tokenize(text) for _, text in DOCUMENTS]
    return [usage_record(f"cmpl-{i}", "m", "a", "key_1", texts[i % 5][:8], [texts[i % 5][8:]]) for i in range(count)]


async def test_slow_attribution_spills_to_the_usage_log_and_every_response_is_billed_once(
        built: tuple[Path, IndexManifest], tokenize, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """200 responses arrive far faster than attribution (20 ms each) runs, with room for 4 in memory.
    Past 4 the records wait in the usage log; those that waited more than 1 s are shed (billed
    unattributed). Memory never holds more than 4 responses (plus none whose usage record is durable);
    every response reaches the outbox exactly once; the usage log is empty at the end."""
    outbox = CountingOutbox(tmp_path / "outbox")
    usage_log = UsageLog(tmp_path / "outbox" / "usage")
    metrics = AttributionMetrics(CollectorRegistry())
    service = AttributionService(LedgerLineages(OneLineage(built[0])), outbox=outbox, usage_log=usage_log,
                                 attributors=SlowAttributors(0.02), queue_max=4, max_lag_seconds=1.0,
                                 metrics=metrics, recover_seconds=3600)
    records = responses(tokenize, 200)
    peak_held = peak_waiting = 0
    summaries = deferred = 0
    try:
        for record in records:  # as the response path does: both at once, then wait for durability
            written = service.record_usage(record)
            pending = service.submit(record)
            await asyncio.wrap_future(written)  # type: ignore[arg-type]
            held, waiting, in_memory = service.lag_state()
            assert held <= 4, "more responses in memory than the bound"
            assert in_memory == 0, "a response waiting on disk is still held in memory"
            peak_held, peak_waiting = max(peak_held, held), max(peak_waiting, waiting)
            if pending.done() and isinstance(pending.exception(), AttributionDeferred):
                deferred += 1
            else:
                summaries += 1
            await asyncio.sleep(0.002)  # ~2 ms between responses: ten times faster than attribution
        await asyncio.to_thread(wait_until, lambda: len(outbox.puts) == 200 and service.lag_state()[:2] == (0, 0))
        assert peak_held == 4 and peak_waiting > 50 and deferred > 50 and summaries >= 4
        assert set(outbox.puts) == {r.trace_id for r in records} and set(outbox.puts.values()) == {1}
        traces = [outbox.read(path) for _, path in outbox.pending(1000)]
        methods = Counter(trace.method for trace in traces)
        assert methods[METHOD] >= 10 and methods[OVERLOAD_METHOD] >= 10 and sum(methods.values()) == 200
        assert all(t.completion_tokens == len(r.choices[0]) for t, r in zip(
            sorted(traces, key=lambda t: t.trace_id), sorted(records, key=lambda r: r.trace_id), strict=True))
        assert service.stats()["attribution_shed_total"] == methods[OVERLOAD_METHOD]
        lags = next(s.value for s in metrics.lag.collect()[0].samples if s.name.endswith("_count"))
        assert lags == 200, "one lag observation per response"
        assert usage_log.unsettled() == 0 and list((tmp_path / "outbox" / "usage").glob("*.jsonl")) == []
    finally:
        service.close()


async def test_responses_waiting_on_disk_at_a_stop_are_billed_once_by_the_next_process(
        built: tuple[Path, IndexManifest], tokenize, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outbox = CountingOutbox(tmp_path / "outbox")
    usage_dir = tmp_path / "outbox" / "usage"
    first = AttributionService(LedgerLineages(OneLineage(built[0])), outbox=outbox, usage_log=UsageLog(usage_dir),
                               attributors=SlowAttributors(0.3), queue_max=1, recover_seconds=3600)
    records = responses(tokenize, 30)
    for record in records:
        await asyncio.wrap_future(first.record_usage(record))  # type: ignore[arg-type]
        first.submit(record)
    assert first.lag_state()[1] >= 25
    first.close(wait_seconds=10)  # the one in memory finishes; the others stay waiting in the usage log
    second = AttributionService(LedgerLineages(OneLineage(built[0])), outbox=outbox, usage_log=UsageLog(usage_dir),
                                processes=False, recover_seconds=3600)
    try:
        await asyncio.to_thread(wait_until, lambda: len(outbox.puts) == 30)
        await asyncio.to_thread(wait_until, lambda: not list(usage_dir.glob("*.jsonl")))
        assert set(outbox.puts) == {r.trace_id for r in records} and set(outbox.puts.values()) == {1}
        recovered = [outbox.read(path).recovered for _, path in outbox.pending(100)]
        assert recovered.count(True) >= 25, "the waiting ones were attributed by the next process"
    finally:
        second.close()


async def test_without_a_usage_log_responses_past_the_bound_are_shed_at_once(
        built: tuple[Path, IndexManifest], tokenize, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outbox = CountingOutbox(tmp_path / "outbox")
    service = AttributionService(LedgerLineages(OneLineage(built[0])), outbox=outbox,
                                 attributors=SlowAttributors(0.05), queue_max=2)
    records = responses(tokenize, 30)
    try:
        futures = [service.submit(record) for record in records]
        assert service.lag_state()[0] <= 2
        shed = [f.result() for f in futures if f.done() and f.result().method == OVERLOAD_METHOD]
        assert len(shed) >= 25 and all(trace.attributed_fraction == 0 for trace in shed)
        traces = await asyncio.gather(*futures)
        assert [t.trace_id for t in traces] == [r.trace_id for r in records]
        await asyncio.to_thread(wait_until, lambda: len(outbox.puts) == 30)
        assert set(outbox.puts.values()) == {1}
    finally:
        service.close()


def test_the_bound_must_be_positive(built: tuple[Path, IndexManifest]) -> None:
    with pytest.raises(ValueError):
        AttributionService(LedgerLineages(OneLineage(built[0])), queue_max=0, processes=False)
