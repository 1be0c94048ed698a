"""The ledger's gRPC service over a real server on loopback: ingest acks, look-ups, status codes, auth.

The refusals of calls without the token by a real `gateway ledger serve` process are in
test_service_auth.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.client.trace_wire import trace_to_pb
from ledger.journal.journal import Journal
from ledger.service import start_server
from tests.conftest import free_port
from tests.ledger.conftest import CIDS, OWNER
from tests.registry.test_datanet_registry import ALICE
from tests.support.credentials import ledger_channel
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

Ack = ledger_pb2.IngestAck
TOKEN = "test-ledger-token-0123456789"


def make_trace(trace_id: str, weight: float = 1.0, tokens: int = 3) -> AttributionTrace:
    token = TokenAttribution(token_id=7, weights=((CIDS[0], weight),), unattributed=1.0 - weight)
    return AttributionTrace(trace_id=trace_id, model="river-guide", adapter="river-guide", requester=None,
                            prompt_tokens=5, completion_tokens=tokens, tokens=(token,) * tokens, method="m")


@pytest.fixture()
def ledger(journal: Journal) -> Iterator[tuple[ledger_pb2_grpc.LedgerStub, grpc.Channel]]:
    port = free_port()
    server = start_server(journal, "127.0.0.1", port, token=TOKEN)
    channel = ledger_channel(f"127.0.0.1:{port}", TOKEN)
    yield ledger_pb2_grpc.LedgerStub(channel), channel
    channel.close()
    server.stop(0).wait()


def ingest(stub: ledger_pb2_grpc.LedgerStub, *batches: list[ledger_pb2.AttributionTrace]) -> list[Ack]:
    return list(stub.Ingest(iter([ledger_pb2.IngestRequest(traces=batch) for batch in batches]), timeout=30))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_ingest_answers_one_ack_per_trace_in_order(ledger: tuple[ledger_pb2_grpc.LedgerStub, grpc.Channel]) -> None:
    stub, _ = ledger
    first, second = trace_to_pb(make_trace("a")), trace_to_pb(make_trace("b", 0.5))
    broken = trace_to_pb(make_trace("c"))
    broken.tokens[0].unattributed = 0.5  # weights + unattributed = 1.5: not a trace
    changed = trace_to_pb(make_trace("a", 0.25))
    acks = ingest(stub, [first, second, broken], [first], [changed])
    assert [(a.trace_id, a.status) for a in acks] == [
        ("a", Ack.STATUS_ACCEPTED), ("b", Ack.STATUS_ACCEPTED), ("c", Ack.STATUS_REJECTED),
        ("a", Ack.STATUS_DUPLICATE), ("a", Ack.STATUS_CONFLICT)]
    assert "invalid trace" in acks[2].reason and "!= 1" in acks[2].reason
    assert acks[3].entry_id == acks[0].entry_id
    record = stub.GetTrace(ledger_pb2.GetTraceRequest(trace_id="a"))
    assert record.trace == first, "the stored trace is the first one, never overwritten"
    assert sum(int(p.amount) for p in record.entry.postings) == 0 and int(record.fee) > 0
    totals = stub.GetTotals(ledger_pb2.GetTotalsRequest())
    assert (totals.traces, totals.conflicts, totals.postings_sum, totals.unbalanced_entries) == (2, 1, "0", 0)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_look_ups_and_their_errors(ledger: tuple[ledger_pb2_grpc.LedgerStub, grpc.Channel]) -> None:
    stub, _ = ledger
    ingest(stub, [trace_to_pb(make_trace("a"))])
    balance = stub.GetBalance(ledger_pb2.GetBalanceRequest(address=ALICE.address.lower()))
    assert balance.subject == ALICE.address and int(balance.payable) > 0 and balance.pending == balance.paid == "0"
    owner = stub.GetBalance(ledger_pb2.GetBalanceRequest(account=f"payable:{OWNER.address}"))
    assert int(owner.amount) > 0
    statement = stub.GetStatement(ledger_pb2.GetStatementRequest(address=ALICE.address))
    assert [(line.ref, line.role) for line in statement.lines] == [("a", "contributor")]
    assert statement.balance.payable == balance.payable
    for call, request, code in [
        (stub.GetTrace, ledger_pb2.GetTraceRequest(trace_id="nope"), grpc.StatusCode.NOT_FOUND),
        (stub.GetBalance, ledger_pb2.GetBalanceRequest(address="alice"), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.GetBalance, ledger_pb2.GetBalanceRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.GetStatement, ledger_pb2.GetStatementRequest(address="0x12"), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.GetStatement, ledger_pb2.GetStatementRequest(address=ALICE.address, limit=10**6),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        assert caught.value.code() == code, request


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_call_needs_the_token_and_health_stays_open(journal: Journal) -> None:
    port = free_port()
    server = start_server(journal, "127.0.0.1", port, token="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.GetTotals(ledger_pb2.GetTotalsRequest(), timeout=10, metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as caught:
                    list(stub.Ingest(iter([ledger_pb2.IngestRequest(traces=[trace_to_pb(make_trace("x"))])]),
                                     timeout=10, metadata=metadata))
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert journal.trace("x") is None, "nothing is stored without the token"
            good = (("authorization", "Bearer s3cret"),)
            assert stub.GetTotals(ledger_pb2.GetTotalsRequest(), timeout=10, metadata=good).traces == 0
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0).wait()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_there_is_no_server_without_a_token(journal: Journal) -> None:
    port = free_port()
    with pytest.raises(ValueError, match="needs a token"):
        start_server(journal, "127.0.0.1", port, token="")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
