"""`LedgerReads` (ledger/client/reads.py) against a real served ledger, and `Ledger.GetUsage` on both backends.

Traces go in through the ledger's Ingest API with the journal's clock set per trace, so their
`received_at` falls where each test wants it; the usage window is computed from a fixed "now".
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from ledger.client.access import LedgerUnavailable
from ledger.client.config import LedgerClientConfig
from ledger.client.reads import (Balances, EntryView, LedgerReads, PostingView, StatementLineView,
                                 UsageBucketView)
from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.client.trace_wire import trace_to_pb
from ledger.journal.journal import Journal
from registry.adapters import AdapterRegistry
from registry.config import DatanetConfig
from registry.datanets import DatanetRegistry
from tests.ledger.conftest import CIDS, OWNER, PRICE, rivers_ledger
from tests.registry.test_datanet_registry import ALICE, BOB
from tests.support.credentials import ledger_channel
from tests.support.ledger_server import ServedLedger, served_ledger
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

LAKE_PRICE = 3 * 10**21 + 7  # odd: fees are floored
PROMPT = 5
NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
Ack = ledger_pb2.IngestAck


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def fee(price: int, completion: int) -> int:
    """The fee the ledger must charge (written out here, not taken from the ledger's code)."""
    return price * (PROMPT + completion) // 1000


# (trace id, adapter, received at, completion tokens)
TRACES = [
    ("r1", "river-guide", "2026-03-10 09:00:00", 3),
    ("r2", "river-guide", "2026-03-10 09:59:59.999999", 4),
    ("r3", "river-guide", "2026-03-09 00:00:00", 5),
    ("r4", "river-guide", "2026-03-08 23:59:59.999999", 2),
    ("r5", "river-guide", "2026-02-08 23:59:59", 1),  # one second before the 30 days of NOW
    ("r6", "river-guide", "2026-02-09 00:00:00", 6),  # the first of the 30 days
    ("l1", "lake-guide", "2026-03-10 00:00:00", 2),
    ("l2", "lake-guide", "2026-03-09 16:00:00", 3),  # the first of the 24 hours of NOW
    ("l3", "lake-guide", "2026-03-09 15:59:59", 1),  # one second before them
    ("b1", None, "2026-03-10 10:00:00", 2),  # the base model: no fee
    ("f1", "river-guide", "2026-03-11 00:00:00", 1),  # after the current day: never counted
]


def make_trace(trace_id: str, adapter: str | None, completion: int) -> AttributionTrace:
    token = TokenAttribution(token_id=7, weights=((CIDS[0], 0.5), (CIDS[2], 0.25)), unattributed=0.25)
    return AttributionTrace(trace_id=trace_id, model=adapter or "base", adapter=adapter, requester=None,
                            prompt_tokens=PROMPT, completion_tokens=completion, tokens=(token,) * completion,
                            method="m")


@contextmanager
def rivers_served(url: str, tmp_path: Path) -> Iterator[ServedLedger]:
    """The ledger of tests/ledger/conftest.py's `rivers_ledger` plus adapter 'lake-guide', served."""
    engine = rivers_ledger(url, tmp_path / "work")
    adapters = AdapterRegistry(engine, DatanetRegistry(engine, DatanetConfig()))
    adapters.register("lake-guide", uri="file:///y", base_model="tiny", owner=BOB.address,
                      price_per_1k_tokens=LAKE_PRICE, lineage=adapters.resolve_lineage(["rivers"]), source="trained")
    engine.dispose()
    with served_ledger(tmp_path / "state", url) as ledger:
        yield ledger


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """The journal's clock (what a trace's received_at and its entry's created_at are), and NOW for usage."""
    now = [NOW]
    monkeypatch.setattr("ledger.journal.journal.utcnow", lambda: now[0])
    monkeypatch.setattr("ledger.journal.usage.utcnow", lambda: NOW)
    return now


def ingest(ledger: ServedLedger, clock: list[datetime], traces: list[tuple[str, str | None, str, int]]) -> None:
    """Each trace through the Ingest API, with the journal's clock at its time; all must be accepted."""
    with ledger_channel(ledger.target, ledger.token) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        for trace_id, adapter, received, completion in traces:
            clock[0] = at(received)
            request = ledger_pb2.IngestRequest(traces=[trace_to_pb(make_trace(trace_id, adapter, completion))])
            [ack] = list(stub.Ingest(iter([request]), timeout=30))
            assert (ack.trace_id, ack.status) == (trace_id, Ack.STATUS_ACCEPTED), ack.reason


def totals(ledger: ServedLedger) -> ledger_pb2.Totals:
    with ledger_channel(ledger.target, ledger.token) as channel:
        return ledger_pb2_grpc.LedgerStub(channel).GetTotals(ledger_pb2.GetTotalsRequest(), timeout=10)


def bucket(adapter: str, start: str, requests: int, tokens: int, fees: int) -> UsageBucketView:
    return UsageBucketView(adapter, at(start), requests, tokens, fees)


def test_usage_counts_each_adapter_per_day_and_hour(database_url: str, tmp_path: Path, clock: list[datetime]) -> None:
    r, lake = PRICE, LAKE_PRICE
    if database_url.startswith("postgresql"):  # the ledger's sessions in another zone: buckets stay UTC days
        database_url += "?options=-c%20TimeZone%3DAsia%2FKolkata"
    with rivers_served(database_url, tmp_path) as ledger, LedgerReads(ledger.target, ledger.token) as reads:
        assert reads.usage() == (), "no traces yet"
        ingest(ledger, clock, TRACES)
        days = reads.usage()
        assert days == (
            bucket("", "2026-03-10", 1, 2, 0),
            bucket("lake-guide", "2026-03-09", 2, 4, fee(lake, 3) + fee(lake, 1)),
            bucket("lake-guide", "2026-03-10", 1, 2, fee(lake, 2)),
            bucket("river-guide", "2026-02-09", 1, 6, fee(r, 6)),
            bucket("river-guide", "2026-03-08", 1, 2, fee(r, 2)),
            bucket("river-guide", "2026-03-09", 1, 5, fee(r, 5)),
            bucket("river-guide", "2026-03-10", 2, 7, fee(r, 3) + fee(r, 4)),
        )
        assert days[-1].fees > 2**64 and days[-1].fees == 17 * 10**19, "fees beyond 64 bits are summed exactly"
        assert LAKE_PRICE * 7 % 1000 and fee(lake, 2) == 21 * 10**18, "lake fees are floored"
        assert all(b.start.tzinfo is not None and b.start.utcoffset().total_seconds() == 0 for b in days)
        assert reads.usage(bucket="hour", buckets=24) == (
            bucket("", "2026-03-10 10:00", 1, 2, 0),
            bucket("lake-guide", "2026-03-09 16:00", 1, 3, fee(lake, 3)),
            bucket("lake-guide", "2026-03-10 00:00", 1, 2, fee(lake, 2)),
            bucket("river-guide", "2026-03-10 09:00", 2, 7, fee(r, 3) + fee(r, 4)),
        )
        assert reads.usage(bucket="hour", buckets=1) == (), "nothing came in during NOW's hour"
        assert reads.usage(["lake-guide"], buckets=1) == (bucket("lake-guide", "2026-03-10", 1, 2, fee(lake, 2)),)
        assert reads.usage("lake-guide", buckets=1) == reads.usage(["lake-guide"], buckets=1)
        assert reads.usage([""]) == (bucket("", "2026-03-10", 1, 2, 0),), "the base model is asked for as ''"
        assert reads.usage(["river-guide", ""], buckets=2) == (
            days[0], bucket("river-guide", "2026-03-09", 1, 5, fee(r, 5)), days[-1])
        assert reads.usage(["no-such-adapter"]) == ()
        year = reads.usage(buckets=366)
        assert year == (*days[:3], bucket("river-guide", "2026-02-08", 1, 1, fee(r, 1)), *days[3:]), \
            "366 days reach the trace one second before the 30 days, never the one after today"
        everything = totals(ledger)
        assert everything.traces == len(TRACES)
        assert sum(b.fees for b in year) + fee(r, 1) == int(everything.fees), "all but f1's fee, exactly"
        assert sum(b.requests for b in year) == len(TRACES) - 1
        assert sum(b.completion_tokens for b in year) + 1 == everything.completion_tokens


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_usage_requests_are_refused_clearly_and_change_nothing(database_url: str, tmp_path: Path,
                                                                    clock: list[datetime]) -> None:
    with rivers_served(database_url, tmp_path) as ledger, LedgerReads(ledger.target, ledger.token) as reads:
        ingest(ledger, clock, TRACES[:5])
        before, usage_before = totals(ledger), reads.usage()
        assert len(usage_before) == 3, "r5 is before the 30 days"
        for call, message in [
            (lambda: reads.usage(bucket="week"), "bucket must be 'day' or 'hour', not 'week'"),
            (lambda: reads.usage(bucket="Day"), "bucket must be 'day' or 'hour', not 'Day'"),
            (lambda: reads.usage(buckets=367), "buckets must be between 1 and 366 for bucket 'day', not 367"),
            (lambda: reads.usage(bucket="hour", buckets=721),
             "buckets must be between 1 and 720 for bucket 'hour', not 721"),
            (lambda: reads.usage([f"a{i}" for i in range(1001)]), "at most 1000 adapters per request, not 1001"),
        ]:
            with pytest.raises(ValueError) as caught:
                call()
            assert str(caught.value) == message
        with ledger_channel(ledger.target, ledger.token) as channel, pytest.raises(grpc.RpcError) as refused:
            ledger_pb2_grpc.LedgerStub(channel).GetUsage(ledger_pb2.GetUsageRequest(bucket="week"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(reads.usage(bucket="hour", buckets=720)) == 4, "the largest window of hours is allowed (r5 in it)"
        assert len(reads.usage(buckets=366)) == 4
        assert reads.usage(buckets=0) == usage_before, "0 buckets is the default, 30"
        assert totals(ledger) == before and reads.usage() == usage_before


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_balance_statement_and_trace_record_are_what_the_journal_holds(database_url: str, tmp_path: Path,
                                                                       clock: list[datetime]) -> None:
    with rivers_served(database_url, tmp_path) as ledger, LedgerReads(ledger.target, ledger.token) as reads:
        ingest(ledger, clock, TRACES[:4] + TRACES[6:8])
        journal = Journal(ledger.engine)
        for address in (ALICE.address, BOB.address, OWNER.address):
            held = journal.balance(address)
            read = reads.balance(address.lower())
            assert read == Balances(held.address, held.payable, held.pending, held.paid)
            assert read.address == address
        assert reads.balance(ALICE.address).payable > 2**64

        page = reads.statement(ALICE.address)
        lines = journal.statement(ALICE.address)
        assert len(page.lines) == len(lines) == 6
        assert page.lines == tuple(
            StatementLineView(line.entry_id, line.kind, line.ref, line.account, line.amount, line.role,
                              datetime.fromisoformat(line.created_at), None, ()) for line in lines)
        assert [line.ref for line in page.lines] == ["l2", "l1", "r4", "r3", "r2", "r1"], "newest entry first"
        assert page.lines[0].created_at == at("2026-03-09 16:00:00"), "the entry's time, from the journal's clock"
        assert page.address == ALICE.address and page.balances == reads.balance(ALICE.address)
        first = reads.statement(ALICE.address.lower(), limit=2)
        rest = reads.statement(ALICE.address, before_entry_id=first.lines[-1].entry_id)
        assert first.lines + rest.lines == page.lines, "pages follow one another without gap or overlap"
        assert first.balances == page.balances, "balances are the address's whole, whatever the page"

        for trace_id, adapter, received, completion in (TRACES[0], TRACES[6]):
            held_record = journal.trace(trace_id)
            assert held_record is not None
            record = reads.trace_record(trace_id)
            assert record is not None
            assert record.trace == held_record.trace == make_trace(trace_id, adapter, completion)
            assert record.received_at == at(received)
            assert (record.content_sha256, record.fee, record.price_per_1k_tokens) == (
                held_record.content_sha256, held_record.fee, held_record.price_per_1k_tokens)
            assert record.fee == fee(PRICE if adapter == "river-guide" else LAKE_PRICE, completion)
            entry = held_record.entry
            assert record.entry == EntryView(entry.id, entry.kind, entry.ref, datetime.fromisoformat(entry.created_at),
                                             tuple(PostingView(p.account, p.amount, p.role) for p in entry.postings))
            assert record.entry.ref == trace_id and sum(p.amount for p in record.entry.postings) == 0
        assert reads.trace_record("no-such-trace") is None
        assert reads.trace_record("") is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_malformed_address_is_a_value_error_and_changes_nothing(database_url: str, tmp_path: Path,
                                                                  clock: list[datetime]) -> None:
    with rivers_served(database_url, tmp_path) as ledger, LedgerReads(ledger.target, ledger.token) as reads:
        ingest(ledger, clock, TRACES[:1])
        before = totals(ledger)
        for address in ("0x12", "alice", "", ALICE.address + "00"):
            with pytest.raises(ValueError, match="is not an Ethereum address"):
                reads.balance(address)
            with pytest.raises(ValueError, match="is not an Ethereum address"):
                reads.statement(address)
        with pytest.raises(ValueError, match="limit must be <= 10000"):
            reads.statement(ALICE.address, limit=10_001)
        assert totals(ledger) == before


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_one_client_from_the_state_directory_serves_many_threads(database_url: str, tmp_path: Path,
                                                                 clock: list[datetime]) -> None:
    with rivers_served(database_url, tmp_path) as ledger:
        ingest(ledger, clock, TRACES[:2])
        reads = LedgerReads.for_state_dir(ledger.state, LedgerClientConfig(address=ledger.target))
        try:
            expected = (reads.balance(ALICE.address), reads.usage(), reads.trace_record("r2"))
            assert expected[0].payable > 0 and len(expected[1]) == 1 and expected[2] is not None
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(
                    lambda _: (reads.balance(ALICE.address), reads.usage(), reads.trace_record("r2")), range(64)))
            assert answers == [expected] * 64
        finally:
            reads.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_stopped_ledger_or_a_wrong_token_is_unavailable(database_url: str, tmp_path: Path,
                                                          clock: list[datetime]) -> None:
    with rivers_served(database_url, tmp_path) as ledger:
        ingest(ledger, clock, TRACES[:1])
        with LedgerReads(ledger.target, "not-the-ledger-token") as stranger:
            with pytest.raises(LedgerUnavailable, match="did not answer GetBalance: UNAUTHENTICATED"):
                stranger.balance(ALICE.address)
            with pytest.raises(LedgerUnavailable, match="did not answer GetTrace: UNAUTHENTICATED"):
                stranger.trace_record("r1")
            with pytest.raises(LedgerUnavailable, match="did not answer GetUsage: UNAUTHENTICATED"):
                stranger.usage()
        reads = LedgerReads(ledger.target, ledger.token, timeout=3)
        assert reads.trace_record("r1") is not None
    try:
        for method, call in [("GetBalance", lambda: reads.balance(ALICE.address)),
                             ("GetStatement", lambda: reads.statement(ALICE.address)),
                             ("GetTrace", lambda: reads.trace_record("r1")),
                             ("GetUsage", lambda: reads.usage())]:
            with pytest.raises(LedgerUnavailable) as caught:
                call()
            assert f"the ledger at {ledger.target} did not answer {method}: UNAVAILABLE" in str(caught.value) \
                or f"did not answer {method}: DEADLINE_EXCEEDED" in str(caught.value), str(caught.value)
    finally:
        reads.close()
