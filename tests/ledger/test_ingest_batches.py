"""Large ingest batches through the ledger's helper process (ledger/journal/prepare_pool.py), on
SQLite and PostgreSQL: idempotent, conflicts store nothing of the conflicting trace, every entry
balances; and the read-ahead pipeline keeps order, never waits for a request the client has not
sent, and survives its helper's death."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.client.trace_wire import trace_to_pb
from ledger.journal.journal import Journal
from ledger.journal.prepare_pool import MIN_POOLED, BatchPreparer, prepare_all
from ledger.service import start_server
from tests.conftest import free_port
from tests.ledger.conftest import CIDS
from tests.support.credentials import ledger_channel
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

Ack = ledger_pb2.IngestAck
TOKEN = "test-ledger-token-batches-0123456789"
SIZE = MIN_POOLED + 4  # large enough to go through the helper


def make_trace(trace_id: str, salt: int = 0) -> ledger_pb2.AttributionTrace:
    tokens = tuple(TokenAttribution(token_id=salt + i, weights=((CIDS[i % 3], 0.25 * (1 + i % 3)),),
                                    unattributed=1.0 - 0.25 * (1 + i % 3)) for i in range(5 + salt % 4))
    return trace_to_pb(AttributionTrace(trace_id=trace_id, model="river-guide", adapter="river-guide", requester=None,
                                        prompt_tokens=7, completion_tokens=len(tokens), tokens=tokens, method="m"))


@pytest.fixture()
def stub(journal: Journal) -> Iterator[ledger_pb2_grpc.LedgerStub]:
    port = free_port()
    server = start_server(journal, "127.0.0.1", port, token=TOKEN, prepare_processes=1)
    channel = ledger_channel(f"127.0.0.1:{port}", TOKEN)
    yield ledger_pb2_grpc.LedgerStub(channel)
    channel.close()
    server.stop(0).wait()


def ingest(stub: ledger_pb2_grpc.LedgerStub, *batches: list[ledger_pb2.AttributionTrace]) -> list[Ack]:
    return list(stub.Ingest(iter([ledger_pb2.IngestRequest(traces=batch) for batch in batches]), timeout=60))


def test_large_batches_are_idempotent_conflicts_store_nothing_and_every_entry_balances(
        stub: ledger_pb2_grpc.LedgerStub) -> None:
    first = [make_trace(f"a-{i}", i) for i in range(SIZE)]
    broken = make_trace("a-broken")
    broken.tokens[0].unattributed = 0.9  # weights + unattributed != 1
    batch = first[:7] + [broken] + first[7:]
    before_helpers = _helpers()
    acks = ingest(stub, batch, batch)  # the second is a resend of the whole batch
    assert _helpers() - before_helpers, "the batches went through a helper process"
    statuses = [(a.trace_id, a.status) for a in acks]
    expected = [(m.trace_id, Ack.STATUS_REJECTED if m is broken else Ack.STATUS_ACCEPTED) for m in batch]
    assert statuses[:len(batch)] == expected
    assert statuses[len(batch):] == [(t, Ack.STATUS_REJECTED if t == "a-broken" else Ack.STATUS_DUPLICATE)
                                     for t, _ in expected]
    assert [a.entry_id for a in acks[len(batch):]] == [a.entry_id for a in acks[:len(batch)]]
    assert "invalid trace" in acks[7].reason
    before = stub.GetTotals(ledger_pb2.GetTotalsRequest())
    assert (before.traces, before.entries, before.conflicts) == (SIZE, SIZE, 0)

    # One stored id with other content, one with the same, and new traces, in one batch.
    changed = make_trace("a-3", 99)
    second = [make_trace(f"b-{i}", i) for i in range(SIZE)]
    acks = ingest(stub, second[:5] + [changed, first[5]] + second[5:])
    assert [a.status for a in acks] == [Ack.STATUS_ACCEPTED] * 5 + [Ack.STATUS_CONFLICT, Ack.STATUS_DUPLICATE] + [
        Ack.STATUS_ACCEPTED] * (SIZE - 5)
    assert stub.GetTrace(ledger_pb2.GetTraceRequest(trace_id="a-3")).trace == first[3], "the stored trace is kept"
    new_postings = 0
    for message in first + second:
        record = stub.GetTrace(ledger_pb2.GetTraceRequest(trace_id=message.trace_id))
        amounts = [int(p.amount) for p in record.entry.postings]
        assert sum(amounts) == 0 and sum(a for a in amounts if a > 0) == int(record.fee) > 0
        new_postings += len(amounts) if message in second else 0
    after = stub.GetTotals(ledger_pb2.GetTotalsRequest())
    assert (after.traces, after.entries, after.conflicts) == (2 * SIZE, 2 * SIZE, 1)
    assert after.postings == before.postings + new_postings, "nothing of the conflicting trace is posted"
    assert (after.postings_sum, after.unbalanced_entries) == ("0", 0)


def _requests(count: int) -> list[ledger_pb2.IngestRequest]:
    requests = []
    for r in range(count):
        traces = [make_trace(f"r{r}-{i}", i) for i in range(SIZE)]
        traces[r % SIZE].tokens[0].unattributed = 2.0  # one refused trace per request
        requests.append(ledger_pb2.IngestRequest(traces=traces))
    return requests


def test_the_pipeline_keeps_order_and_never_waits_for_an_unsent_request() -> None:
    requests = _requests(4)
    acked: queue.Queue[int] = queue.Queue()

    def lockstep() -> Iterator[ledger_pb2.IngestRequest]:  # a client that sends the next after the acks
        for index, request in enumerate(requests):
            if index:
                assert acked.get(timeout=60) == index - 1
            yield request

    preparer = BatchPreparer(1)
    try:
        got = []
        for index, (request, outcomes) in enumerate(preparer.pipeline(lockstep())):
            got.append((request, outcomes))
            acked.put(index)
    finally:
        preparer.close()
    assert [r for r, _ in got] == requests
    assert [o for _, o in got] == [prepare_all(r.traces) for r in requests]
    assert all(isinstance(o[i % SIZE], str) for i, (_, o) in enumerate(got))


def test_a_dead_helper_is_replaced_and_its_batch_prepared_in_place() -> None:
    requests = _requests(6)
    preparer = BatchPreparer(1)
    got = []
    try:
        for index, (request, outcomes) in enumerate(preparer.pipeline(requests)):
            got.append(outcomes)
            if index == 1:
                helpers = _helpers()
                assert helpers, "the helper process runs"
                for pid in helpers:
                    psutil.Process(pid).kill()
    finally:
        preparer.close()
    assert got == [prepare_all(r.traces) for r in requests]


def _helpers() -> set[int]:
    return {p.pid for p in psutil.Process().children() if "ledger.journal.prepare_pool" in p.cmdline()}


def test_without_a_helper_process_nothing_is_spawned() -> None:
    before = _helpers()
    requests = _requests(2)
    assert [o for _, o in BatchPreparer(0).pipeline(requests)] == [prepare_all(r.traces) for r in requests]
    assert _helpers() <= before


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_stream_cancelled_by_its_client_ends_its_read_ahead(stub: ledger_pb2_grpc.LedgerStub) -> None:
    def slow() -> Iterator[ledger_pb2.IngestRequest]:
        yield ledger_pb2.IngestRequest(traces=[make_trace(f"c-{i}", i) for i in range(SIZE)])
        raise RuntimeError("the client gives up")

    with pytest.raises(grpc.RpcError):
        list(stub.Ingest(slow(), timeout=30))
    assert stub.GetTotals(ledger_pb2.GetTotalsRequest()).traces in (0, SIZE)


HELPER_OWNER = """
import sys
from ledger.journal.prepare_pool import BatchPreparer
from tests.ledger.test_ingest_batches import _helpers, _requests
if __name__ == "__main__":
    preparer = BatchPreparer(1)
    list(preparer.pipeline(_requests(1)))
    print(*_helpers(), flush=True)
    sys.stdin.read()
"""


def test_the_helper_exits_when_the_ledger_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(HELPER_OWNER)
    root = str(Path(__file__).parents[2])
    owner = subprocess.Popen([sys.executable, str(script)], cwd=root, env={**os.environ, "PYTHONPATH": root},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        helpers = [psutil.Process(int(pid)) for pid in owner.stdout.readline().split()]  # type: ignore[union-attr]
        assert helpers and all(helper.is_running() for helper in helpers)
    finally:
        owner.kill()
        owner.wait()
    gone, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, "a helper outlived its SIGKILLed ledger"
