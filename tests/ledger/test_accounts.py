"""Requester accounts on SQLite and PostgreSQL: idempotent credits, holds that never overdraw."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from ledger.accounts.accounts import (
    Accounts,
    CreditConflict,
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

    from ledger.accounts.transfers import POSTED, Transfers

    transfers = Transfers(journal.engine)
    fee = PRICE * 12 // 1000
    transfers.hold("t-1", "acme", 3 * fee)  # the worst case reserved at admission
    [accepted] = journal.ingest([trace("t-1", key.id)])
    assert accepted.status == "accepted"
    payer = [p for p in journal.trace("t-1").entry.postings if p.role == "payer"]
    assert [(p.account, p.amount) for p in payer] == [("requester:acme", -fee)]
    assert accounts.balance("acme") == type(accounts.balance("acme"))("acme", 10 * PRICE - fee, 0)
    assert (transfers.get("t-1").state, transfers.get("t-1").posted) == (POSTED, fee), "posted in the ingest"
    accounts.check("acme")
    transfers.check("acme")

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
    """A connection the server closed is never used again: the pool checks connections out with a ping."""
    import uuid

    import psycopg

    from ledger.accounts.transfers import Transfers

    url = postgres.create_database(f"t{uuid.uuid4().hex[:12]}")
    engine = open_database(url)
    accounts, transfers = Accounts(engine), Transfers(engine)
    accounts.create("acme")
    accounts.credit("acme", 10**24, "c1")  # beyond 64 bits: the driver sends exact numerics
    transfers.hold("before", "acme", 10**23 + 7)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as other:
        ended = other.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    assert ended[0] >= 1, "the pooled connection was ended by the server"
    transfers.hold("after", "acme", 1)
    assert accounts.balance("acme").held == 10**23 + 8
    transfers.check("acme")
    accounts.check("acme")
    engine.dispose()
