"""Acks per request (`IngestRequest.ack_per_request`): one message per request carrying every trace's
ack, with the same statuses, entry ids and reasons as one message per trace; sent only after the
request's transaction committed; the shipper reading them; and requests already prepared written
together (`BatchPreparer.groups`)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from sqlalchemy.exc import OperationalError

from attribution.outbox import Outbox
from attribution.shipper import TraceShipper
from ledger.client.trace import AttributionTrace
from ledger.client.trace_wire import trace_to_pb
from ledger.journal.journal import Journal
from ledger.journal.prepare_pool import BatchPreparer, prepare_all
from ledger.service import LedgerServicer, start_server
from tests.conftest import free_port
from tests.ledger.test_ingest_batches import SIZE
from tests.ledger.test_ingest_batches import make_trace as large_trace
from tests.ledger.test_service import make_trace
from tests.support.credentials import ledger_channel
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

Ack = ledger_pb2.IngestAck
TOKEN = "test-ledger-token-acks-0123456789"


@pytest.fixture(params=[0, 1], ids=["in-place", "helper"])
def stub(request: pytest.FixtureRequest, journal: Journal) -> Iterator[ledger_pb2_grpc.LedgerStub]:
    port = free_port()
    server = start_server(journal, "127.0.0.1", port, token=TOKEN, prepare_processes=request.param)
    channel = ledger_channel(f"127.0.0.1:{port}", TOKEN)
    yield ledger_pb2_grpc.LedgerStub(channel)
    channel.close()
    server.stop(0).wait()


def unknown_trace(trace_id: str) -> AttributionTrace:
    """A well-formed trace crediting a contribution the ledger does not know (refused in the transaction)."""
    trace = make_trace(trace_id)
    return replace(trace, tokens=tuple(replace(token, weights=(("ab" * 32, 1.0),), unattributed=0.0)
                                       for token in trace.tokens))


def requests(batches: list[list[ledger_pb2.AttributionTrace]], per_request: bool) -> list[ledger_pb2.IngestRequest]:
    return [ledger_pb2.IngestRequest(traces=batch, ack_per_request=per_request) for batch in batches]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("per_request", [False, True], ids=["per-trace", "per-request"])
def test_acks_per_request_say_what_acks_per_trace_say(stub: ledger_pb2_grpc.LedgerStub, per_request: bool) -> None:
    first = [large_trace(f"a-{i}", i) for i in range(SIZE)]  # large enough for the helper
    broken = large_trace("a-broken")
    broken.tokens[0].unattributed = 0.9  # weights + unattributed != 1: refused before the transaction
    unknown = trace_to_pb(unknown_trace("a-unknown"))
    changed = large_trace("a-0", 99)
    batches = [first[:3] + [broken] + first[3:] + [unknown, first[1]], first[:2] + [changed]]

    messages = list(stub.Ingest(iter(requests(batches, per_request)), timeout=60))

    acks = [ack for message in messages for ack in message.acks] if per_request else messages
    if per_request:
        assert len(messages) == len(batches), "one message per request"
        assert all(not m.trace_id and m.status == Ack.STATUS_UNSPECIFIED for m in messages)
        assert [len(m.acks) for m in messages] == [len(b) for b in batches]
    else:
        assert all(not m.acks for m in messages)
    statuses = [(a.trace_id, a.status) for a in acks]
    accepted = [(m.trace_id, Ack.STATUS_ACCEPTED) for m in first]
    assert statuses == (accepted[:3] + [("a-broken", Ack.STATUS_REJECTED)] + accepted[3:]
                        + [("a-unknown", Ack.STATUS_REJECTED), ("a-1", Ack.STATUS_DUPLICATE),
                           ("a-0", Ack.STATUS_DUPLICATE), ("a-1", Ack.STATUS_DUPLICATE), ("a-0", Ack.STATUS_CONFLICT)])
    assert "invalid trace" in acks[3].reason and "unknown contribution id" in acks[SIZE + 1].reason
    assert "ingested before with other content" in acks[-1].reason
    entry_of = {a.trace_id: a.entry_id for a in acks if a.status == Ack.STATUS_ACCEPTED}
    assert all(a.entry_id == entry_of[a.trace_id] for a in acks if a.status == Ack.STATUS_DUPLICATE)
    totals = stub.GetTotals(ledger_pb2.GetTotalsRequest())
    assert (totals.traces, totals.entries, totals.conflicts) == (SIZE, SIZE, 1), "each trace stored once"
    assert totals.postings_sum == "0" and totals.unbalanced_entries == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_requests_acks_come_after_its_commit(stub: ledger_pb2_grpc.LedgerStub) -> None:
    sending: queue.Queue[ledger_pb2.IngestRequest | None] = queue.Queue()
    batches = [[large_trace(f"c-{r}-{i}", i) for i in range(SIZE)] for r in range(3)]
    for request in requests(batches, per_request=True):
        sending.put(request)
    sending.put(None)
    call = stub.Ingest(iter(sending.get, None), timeout=60)
    for message, batch in zip(call, batches, strict=True):
        assert [a.trace_id for a in message.acks] == [t.trace_id for t in batch]
        for ack in message.acks:  # visible to another connection as soon as its ack is out
            record = stub.GetTrace(ledger_pb2.GetTraceRequest(trace_id=ack.trace_id))
            assert record.entry.id == ack.entry_id and ack.status == Ack.STATUS_ACCEPTED


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_request_whose_transaction_fails_gets_no_ack(stub: ledger_pb2_grpc.LedgerStub, journal: Journal,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [[large_trace(f"f-{r}-{i}", i) for i in range(SIZE)] for r in range(3)]
    committed: list[str] = []
    ingest = journal.ingest_prepared

    def second_request_fails(batch):  # type: ignore[no-untyped-def]
        if any(p.trace_id == batches[1][0].trace_id for p in batch):
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        results = ingest(batch)
        committed.extend(p.trace_id for p in batch)
        return results

    monkeypatch.setattr(journal, "ingest_prepared", second_request_fails)
    acked = []
    with pytest.raises(grpc.RpcError) as raised:
        for message in stub.Ingest(iter(requests(batches, per_request=True)), timeout=60):
            acked.extend(a.trace_id for a in message.acks)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert acked == committed == [t.trace_id for t in batches[0]], "acked: what committed, nothing after"
    assert stub.GetTotals(ledger_pb2.GetTotalsRequest()).traces == SIZE


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_shipper_asks_for_acks_per_request_and_settles_each_trace(
        journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags: list[bool] = []
    ingest = LedgerServicer.Ingest

    def recording(self, request_iterator, context):  # type: ignore[no-untyped-def]
        def seen() -> Iterator[ledger_pb2.IngestRequest]:
            for request in request_iterator:
                flags.append(request.ack_per_request)
                yield request
        return ingest(self, seen(), context)

    monkeypatch.setattr(LedgerServicer, "Ingest", recording)
    port = free_port()
    server = start_server(journal, "127.0.0.1", port, token=TOKEN, prepare_processes=0)
    outbox = Outbox(tmp_path / "outbox")
    shipper = TraceShipper(outbox, f"127.0.0.1:{port}", token=TOKEN, batch_size=8, window=2)
    try:
        journal.ingest([make_trace("s-00", weight=0.0)])  # already in the ledger: DUPLICATE, removed from the outbox
        for i in range(20):
            outbox.put(make_trace(f"s-{i:02d}", weight=(i % 10) / 10))
        outbox.put(unknown_trace("s-unknown"))
        shipper.start()
        assert shipper.wait_until_empty(30), f"outbox still holds {outbox.depth()} traces"
        stats = shipper.stats()
        assert (stats["shipped"], stats["duplicates"], stats["rejected"]) == (19, 1, 1), stats
    finally:
        shipper.stop()
        server.stop(0).wait()
    assert flags and all(flags)
    reasons = [p.read_text() for p in outbox.rejected_dir.glob("*.reason.txt")]
    assert len(reasons) == 1 and "unknown contribution id" in reasons[0]
    assert journal.totals().traces == 20


def test_groups_join_only_requests_already_prepared() -> None:
    batches = [ledger_pb2.IngestRequest(traces=[large_trace(f"g-{r}-{i}", i) for i in range(SIZE)])
               for r in range(8)]
    preparer = BatchPreparer(1)
    try:
        groups = []
        for group in preparer.groups(iter(batches), max_traces=3 * SIZE):
            groups.append(group)
            time.sleep(0.5)  # the writer is busy: the next requests are read and prepared meanwhile
        acked: queue.Queue[int] = queue.Queue()

        def lockstep() -> Iterator[ledger_pb2.IngestRequest]:  # sends the next request after the acks
            for index, request in enumerate(batches[:3]):
                if index:
                    assert acked.get(timeout=60) == index - 1
                yield request

        alone = []
        for index, group in enumerate(preparer.groups(lockstep(), max_traces=3 * SIZE)):
            alone.append(len(group))
            acked.put(index)
    finally:
        preparer.close()
    assert [request for group in groups for request, _ in group] == batches
    assert [o for group in groups for _, o in group] == [prepare_all(r.traces) for r in batches]
    assert max(len(group) for group in groups) > 1 and all(len(group) <= 3 for group in groups)
    assert alone == [1, 1, 1], "a group never waits for a request the client has not sent"
