"""Requester accounts on SQLite and PostgreSQL: idempotent credits, holds that never overdraw."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from ledger.accounts.accounts import (
    Accounts,
    CreditConflict,
    InsufficientCredit,
    UnknownAccount,
    requester_account,
)
from storage.database import open_database


@pytest.fixture()
def accounts(database_url: str) -> Iterator[Accounts]:
    engine: Engine = open_database(database_url)
    yield Accounts(engine)
    engine.dispose()


def test_an_account_starts_empty_and_bad_ids_are_refused(accounts: Accounts) -> None:
    accounts.create("acme", deposit_address="0x70997970c51812dc3a010c7d01b50e0d17dc79c8")
    assert accounts.balance("acme").available == 0
    assert accounts.get("acme").deposit_address == "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    for bad in ("", "Acme", "-x", "a" * 49, "a b"):
        with pytest.raises(ValueError, match="must be 1-48"):
            accounts.create(bad)
    with pytest.raises(ValueError, match="exists already"):
        accounts.create("acme")
    with pytest.raises(ValueError, match="belongs to another account"):
        accounts.create("other", deposit_address="0x70997970C51812dc3A010C7d01b50e0d17dc79C8")
    with pytest.raises(UnknownAccount, match="no requester account 'ghost'"):
        accounts.balance("ghost")


def test_credits_are_exact_balanced_and_idempotent_on_their_reference(accounts: Accounts) -> None:
    accounts.create("acme")
    big = 10**30 + 7  # beyond 64 bits
    first = accounts.credit("acme", big, "invoice-1")
    again = accounts.credit("acme", big, "invoice-1")
    assert first.created and not again.created and again.entry_id == first.entry_id
    assert accounts.balance("acme").balance == big
    with pytest.raises(CreditConflict, match="already credited with other terms"):
        accounts.credit("acme", big + 1, "invoice-1")
    for amount, message in ((0, "positive"), (-5, "positive")):
        with pytest.raises(ValueError, match=message):
            accounts.credit("acme", amount, "invoice-2")
    with pytest.raises(ValueError, match="reference"):
        accounts.credit("acme", 1, "")
    with pytest.raises(UnknownAccount):
        accounts.credit("ghost", 1, "invoice-3")
    assert accounts.balance("acme").balance == big, "refused credits change nothing"
    accounts.check("acme")
    from ledger.journal.journal import Journal
    from ledger.journal.fee_split import FeeSplitPolicy

    totals = Journal(accounts.engine, FeeSplitPolicy()).totals()
    assert totals.postings_sum == 0 and totals.unbalanced_entries == 0
    assert totals.by_class["requester"] == big and totals.by_class["deposits"] == -big
    assert requester_account("acme") == "requester:acme"


def test_holds_reserve_shrink_and_release(accounts: Accounts) -> None:
    accounts.create("acme")
    accounts.credit("acme", 1000, "c1")
    assert accounts.hold("r1", "acme", 600).available == 400
    with pytest.raises(InsufficientCredit) as refused:
        accounts.hold("r2", "acme", 401)
    assert (refused.value.needed, refused.value.available) == (401, 400)
    with pytest.raises(ValueError, match="already holds"):
        accounts.hold("r1", "acme", 1)
    with pytest.raises(UnknownAccount, match="no requester account 'ghost'"):
        accounts.hold("r3", "ghost", 1)
    with pytest.raises(ValueError, match="cannot be negative"):
        accounts.hold("r4", "acme", -1)
    assert accounts.balance("acme").held == 600, "refused holds reserve nothing"
    accounts.hold("r3", "acme", 0)  # the ids of refused holds are free: nothing of them was stored
    accounts.release("r3")
    accounts.shrink_hold("r1", 250)  # the request cost less than its worst case
    assert accounts.balance("acme").held == 250
    accounts.shrink_hold("r1", 900)  # a hold never grows
    assert accounts.balance("acme").held == 250
    accounts.release("r1")
    accounts.release("r1")  # twice is harmless
    assert accounts.balance("acme").available == 1000
    accounts.check("acme")


def test_stale_holds_are_released_by_age(accounts: Accounts) -> None:
    from datetime import UTC, datetime

    from sqlmodel import Session, select

    from ledger.models import BalanceHold

    accounts.create("acme")
    accounts.credit("acme", 1000, "c1")
    before = datetime.now(UTC)
    accounts.hold("r1", "acme", 300)
    accounts.hold("r2", "acme", 200)
    with Session(accounts.engine) as session:  # written by the hold's own statements, read by the ORM
        stamps = [hold.created_at for hold in session.exec(select(BalanceHold)).all()]
    assert all(before <= stamp <= datetime.now(UTC) for stamp in stamps), stamps
    assert accounts.release_stale_holds(older_than_seconds=3600) == 0
    assert accounts.balance("acme").held == 500
    assert accounts.release_stale_holds(older_than_seconds=0) == 2
    assert accounts.balance("acme").available == 1000
    accounts.check("acme")


def test_concurrent_holds_on_one_account_never_overdraw_it(accounts: Accounts) -> None:
    accounts.create("acme")
    accounts.credit("acme", 1000, "c1")
    granted: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        for i in range(6):
            try:
                accounts.hold(f"w{n}-{i}", "acme", 30)
                granted.append(f"w{n}-{i}")
            except InsufficientCredit:
                refused.append(f"w{n}-{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 33 and len(refused) == 48 - 33  # 33 × 30 = 990 <= 1000 < 34 × 30
    assert accounts.balance("acme").available == 10
    accounts.check("acme")


def test_an_inference_debits_its_requesters_account_and_frees_its_hold(journal) -> None:  # noqa: ANN001
    from ledger.client.trace import AttributionTrace
    from ledger.accounts.api_keys import ApiKeys
    from tests.ledger.conftest import CIDS, PRICE
    from tests.ledger.test_journal import token

    accounts, keys = Accounts(journal.engine), ApiKeys(journal.engine)
    accounts.create("acme")
    accounts.credit("acme", 10 * PRICE, "c1")
    key = keys.create("acme", name="ci").key

    def trace(trace_id: str, requester: str | None) -> AttributionTrace:
        return AttributionTrace(trace_id=trace_id, model="river-guide", adapter="river-guide", requester=requester,
                                prompt_tokens=10, completion_tokens=2, tokens=(token({CIDS[0]: 1.0}),) * 2,
                                method="verbatim-span-v1")

    fee = PRICE * 12 // 1000
    accounts.hold("t-1", "acme", 3 * fee)  # the worst case reserved at admission
    [accepted] = journal.ingest([trace("t-1", key.id)])
    assert accepted.status == "accepted"
    payer = [p for p in journal.trace("t-1").entry.postings if p.role == "payer"]
    assert [(p.account, p.amount) for p in payer] == [("requester:acme", -fee)]
    assert accounts.balance("acme") == type(accounts.balance("acme"))("acme", 10 * PRICE - fee, 0)
    accounts.check("acme")

    [duplicate] = journal.ingest([trace("t-1", key.id)])
    assert duplicate.status == "duplicate" and accounts.balance("acme").balance == 10 * PRICE - fee

    [unknown] = journal.ingest([trace("t-2", "key_000000000000")])
    assert unknown.status == "rejected" and "unknown requester key" in unknown.reason

    keys.revoke(key.id)  # admitted before the revocation: still billed
    assert journal.ingest([trace("t-3", key.id)])[0].status == "accepted"
    assert accounts.balance("acme").balance == 10 * PRICE - 2 * fee
    assert journal.ingest([trace("t-4", None)])[0].status == "accepted"  # no requester: revenue pays
    accounts.check("acme")
    assert journal.totals().postings_sum == 0


def test_holds_go_on_after_postgresql_drops_every_connection(postgres) -> None:  # noqa: ANN001
    """The hold runs on the pooled driver connection: a connection the server closed is never used again."""
    import uuid

    import psycopg

    url = postgres.create_database(f"t{uuid.uuid4().hex[:12]}")
    engine = open_database(url)
    accounts = Accounts(engine)
    accounts.create("acme")
    accounts.credit("acme", 10**24, "c1")  # beyond 64 bits: the driver sends exact numerics
    assert accounts.hold("before", "acme", 10**23 + 7).available == 9 * 10**23 - 7
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as other:
        ended = other.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    assert ended[0] >= 1, "the pooled connection was ended by the server"
    assert accounts.hold("after", "acme", 1).held == 10**23 + 8
    with pytest.raises(ValueError, match="already holds"):
        accounts.hold("after", "acme", 1)
    assert accounts.hold("again", "acme", 1).held == 10**23 + 9, "the pool is usable after a refused hold"
    accounts.check("acme")
    engine.dispose()
