"""Admission in a replica against the ledger's real gRPC Access API: credit leased in chunks and spent
locally, holds reported in batches and posted when the trace is ingested, lease exhaustion, voids,
rate limits shared by two replicas, and a ledger killed (SIGKILL) and restarted in the middle.

Every test ends with the ledger's own invariant checks (`Transfers.check`, `Accounts.check`): the
account's `held` is what its pending leases and holds reserve, and its balance is its postings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine

from gateway.ledger_process import LedgerProcess
from ledger.accounts.accounts import Accounts
from ledger.accounts.api_keys import ApiKeys
from ledger.accounts.transfers import EXPIRED, LEASE, PENDING, POSTED, VOIDED, Transfers
from ledger.client.access import LedgerAccessClient, LedgerUnavailable
from ledger.client.fees import fee_for
from ledger.client.trace import AttributionTrace
from ledger.client.trace_wire import trace_to_pb
from ledger.journal.fee_split import FeeSplitPolicy
from ledger.journal.journal import Journal
from ledger.service import start_server
from serving.access import AccessControl, Caller
from serving.config import AccessConfig
from serving.errors import InsufficientQuota, LedgerUnreachable, RateLimited
from storage.database import database_url
from tests.ledger.conftest import CIDS, PRICE, rivers_ledger
from tests.ledger.test_journal import token
from tests.support.ports import NO_CHAIN, free_port
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

TOKEN = "access-test-token-0123456789"
ADAPTER = "river-guide"  # priced at PRICE per 1k tokens
PROMPT, MAX_TOKENS = 10, 40
WORST = fee_for(PRICE, PROMPT + MAX_TOKENS)
UNLIMITED = AccessConfig(rate_requests_per_second=None, rate_tokens_per_minute=None, lease_requests=4)


@dataclass
class Ledger:
    engine: Engine
    target: str
    key: str

    def replica(self, owner: str, config: AccessConfig = UNLIMITED) -> AccessControl:
        return AccessControl(LedgerAccessClient(self.target, TOKEN, timeout=2.0), config, owner, background=False)

    def transfers(self) -> dict[str, object]:
        return {t.id: t for t in Transfers(self.engine).list("acme")}

    def check(self) -> None:
        Transfers(self.engine).check("acme")
        Accounts(self.engine).check("acme")


def funded(engine: Engine, credit: int) -> str:
    Accounts(engine).create("acme")
    Accounts(engine).credit("acme", credit, "c1")
    return ApiKeys(engine).create("acme").presented


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    engine = rivers_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path)
    key = funded(engine, 10 * WORST)
    port = free_port()
    server = start_server(Journal(engine, FeeSplitPolicy()), "127.0.0.1", port, token=TOKEN)
    yield Ledger(engine, f"127.0.0.1:{port}", key)
    server.stop(0).wait()
    engine.dispose()


def trace(trace_id: str, key_id: str, completion: int) -> AttributionTrace:
    return AttributionTrace(trace_id=trace_id, model=ADAPTER, adapter=ADAPTER, requester=key_id,
                            prompt_tokens=PROMPT, completion_tokens=completion,
                            tokens=tuple(token({CIDS[0]: 1.0}) for _ in range(completion)), method="verbatim-span-v1")


def ingest(target: str, traces: list[AttributionTrace]) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        acks = ledger_pb2_grpc.LedgerStub(channel).Ingest(
            iter([ledger_pb2.IngestRequest(traces=[trace_to_pb(t) for t in traces])]),
            metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        return [ledger_pb2.IngestAck.Status.Name(ack.status) for ack in acks]


def admit(replica: AccessControl, caller: Caller, request_id: str) -> object:
    return replica.admit(caller, request_id, ADAPTER, PROMPT, MAX_TOKENS)


def test_a_replica_spends_its_lease_locally_and_each_hold_is_posted_or_voided_once(ledger: Ledger) -> None:
    replica = ledger.replica("replica-a")
    caller = replica.authenticate(f"Bearer {ledger.key}")
    admitted = [admit(replica, caller, f"r-{i}") for i in range(4)]
    [lease] = ledger.transfers().values()
    assert (lease.kind, lease.amount, lease.state) == (LEASE, 4 * WORST, PENDING), "one lease for four requests"

    replica.credit.flush()  # the background thread's batch
    holds = {k: v for k, v in ledger.transfers().items() if k.startswith("r-")}
    assert {(h.state, h.amount, h.lease_id) for h in holds.values()} == {(PENDING, WORST, lease.id)}
    ledger.check()

    for admission in admitted[:3]:  # three complete (20 tokens each) and are billed; the last one is not
        replica.finish(admission, PROMPT, 20, billed=True)
    replica.finish(admitted[3], PROMPT, 0, billed=False)
    replica.credit.flush()
    assert ingest(ledger.target, [trace(f"r-{i}", caller.key_id, 20) for i in range(3)]) == ["STATUS_ACCEPTED"] * 3
    assert ingest(ledger.target, [trace("r-0", caller.key_id, 20)]) == ["STATUS_DUPLICATE"], "posted once"
    stored = ledger.transfers()
    fee = fee_for(PRICE, PROMPT + 20)
    assert [(stored[f"r-{i}"].state, stored[f"r-{i}"].posted) for i in range(3)] == [(POSTED, fee)] * 3
    assert stored["r-3"].state == VOIDED
    assert Accounts(ledger.engine).balance("acme").balance == 10 * WORST - 3 * fee
    ledger.check()

    replica.close()  # returns the lease: nothing stays reserved
    assert ledger.transfers()[lease.id].state == POSTED
    assert Accounts(ledger.engine).balance("acme").held == 0
    ledger.check()


def test_lease_exhaustion_refuses_with_402_once_the_account_is_spent_and_stores_nothing_for_it(
        ledger: Ledger) -> None:
    replica, other = ledger.replica("replica-a"), ledger.replica("replica-b")
    caller = replica.authenticate(f"Bearer {ledger.key}")
    for i in range(4):
        admit(replica, caller, f"a-{i}")
    for i in range(6):  # the other replica leases the rest of the account
        admit(other, caller, f"b-{i}")
    with pytest.raises(InsufficientQuota, match=f"may cost {WORST} base units and account 'acme' has 0") as refused:
        admit(replica, caller, "a-refused")
    assert refused.value.status == 402
    with pytest.raises(InsufficientQuota):
        admit(other, caller, "b-refused")
    replica.credit.flush()
    other.credit.flush()
    stored = ledger.transfers()
    assert "a-refused" not in stored and "b-refused" not in stored, "a refusal stores nothing"
    balance = Accounts(ledger.engine).balance("acme")
    assert balance.held == balance.balance == 10 * WORST, "every unit is held, none twice"
    ledger.check()
    replica.close()
    other.close()
    assert {t.state for t in ledger.transfers().values() if t.kind == LEASE} == {POSTED}
    ledger.check()


def test_two_replicas_share_one_rate_limit(ledger: Ledger) -> None:
    limited = AccessConfig(rate_requests_per_second=2, rate_tokens_per_minute=None, lease_requests=4)
    a, b = ledger.replica("replica-a", limited), ledger.replica("replica-b", limited)
    caller = a.authenticate(f"Bearer {ledger.key}")
    allowed, refused = 0, 0
    for i in range(6):  # within a few milliseconds: the burst is 2 for the whole deployment, not per replica
        try:
            admit(a if i % 2 else b, caller, f"q-{i}")
            allowed += 1
        except RateLimited as limit:
            assert limit.headers["retry-after"] == "1"
            refused += 1
    assert (allowed, refused) == (2, 4)
    a.close()
    b.close()


def test_a_ledger_killed_and_restarted_in_the_middle_loses_no_hold_and_lends_nothing_twice(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    engine = rivers_ledger(database_url(state), tmp_path)
    key = funded(engine, 10 * WORST)
    port = free_port()
    process = LedgerProcess(state, "127.0.0.1", port, env={"GATEWAY_LEDGER_TOKEN": TOKEN, **NO_CHAIN},
                            log_file=tmp_path / "ledger.log").start()
    ledger = Ledger(engine, process.target, key)
    try:
        replica = ledger.replica("replica-a")
        caller = replica.authenticate(f"Bearer {key}")
        first = [admit(replica, caller, f"r-{i}") for i in range(2)]  # leases 4 x WORST
        replica.credit.flush()

        limited = ledger.replica("replica-b", AccessConfig(rate_requests_per_second=1, rate_tokens_per_minute=None,
                                                         key_cache_seconds=0.2))
        limited_caller = limited.authenticate(f"Bearer {key}")
        process.stop(kill=True)  # SIGKILL: mid-way, with a lease out and holds reported
        during = [admit(replica, caller, f"r-{i}") for i in range(2, 4)]  # the lease needs no ledger
        time.sleep(0.3)  # past the key cache: the last answer stands while the ledger is away
        assert limited.authenticate(f"Bearer {key}") == limited_caller
        exported = REGISTRY.get_sample_value("gateway_rate_local_admissions_total")
        assert limited.admit(limited_caller, "free-1", None, 1, 1).held == 0, "rate limits fall back to this replica"
        with pytest.raises(RateLimited):
            limited.admit(limited_caller, "free-2", None, 1, 1)
        assert limited.rates.local_admissions == 1
        assert REGISTRY.get_sample_value("gateway_rate_local_admissions_total") == exported + 1, "on /metrics"
        with pytest.raises(LedgerUnreachable) as away:
            admit(replica, caller, "r-needs-a-new-lease")
        assert away.value.status == 503 and away.value.headers["retry-after"] == "1"
        for admission in first + during:
            replica.finish(admission, PROMPT, 20, billed=True)
        with pytest.raises(LedgerUnavailable):  # the batch waits for the ledger
            replica.credit.flush()

        process.start()
        replica.credit.flush()  # the queued holds arrive after the restart
        stored = ledger.transfers()
        assert "r-needs-a-new-lease" not in stored
        assert {stored[f"r-{i}"].state for i in range(4)} == {PENDING}
        assert ingest(process.target, [trace(f"r-{i}", caller.key_id, 20) for i in range(4)]) == \
            ["STATUS_ACCEPTED"] * 4
        fee = fee_for(PRICE, PROMPT + 20)
        balance = Accounts(engine).balance("acme")
        assert balance.balance == 10 * WORST - 4 * fee >= 0
        ledger.check()
        replica.close()
        limited.close()
        assert Accounts(engine).balance("acme").held == 0
        ledger.check()
    finally:
        process.stop()
        engine.dispose()


def test_an_unreturned_lease_expires_and_its_late_traces_are_still_charged_once(ledger: Ledger) -> None:
    from datetime import timedelta

    from storage.database import utcnow

    replica = ledger.replica("replica-a")
    caller = replica.authenticate(f"Bearer {ledger.key}")
    admission = admit(replica, caller, "r-0")
    replica.credit.flush()
    expired = Transfers(ledger.engine).expire(utcnow() + timedelta(days=1))  # the replica died: nobody returns it
    assert (expired.leases, expired.holds) == (1, 1)
    assert Accounts(ledger.engine).balance("acme").held == 0
    replica.finish(admission, PROMPT, 20, billed=True)
    assert ingest(ledger.target, [trace("r-0", caller.key_id, 20)]) == ["STATUS_ACCEPTED"]
    late = ledger.transfers()["r-0"]
    assert (late.state, late.late, late.posted) == (POSTED, True, fee_for(PRICE, PROMPT + 20))
    assert [t.state for t in ledger.transfers().values() if t.kind == LEASE] == [EXPIRED]
    ledger.check()
    replica.close()  # returning an expired lease changes nothing
    ledger.check()
