"""Two-phase transfers (leases and holds) on SQLite and PostgreSQL: post, void, expire, repeats,
conflicts, lease exhaustion and shortfall, the bounded overdraw, and a ledger restart."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from ledger.accounts.accounts import Accounts, InsufficientCredit, UnknownAccount
from ledger.accounts.transfers import (
    EXPIRED,
    HOLD,
    LEASE,
    PENDING,
    POSTED,
    VOIDED,
    Expired,
    HoldReport,
    LeaseOutstanding,
    PostOrder,
    TransferConflict,
    TransferRecord,
    Transfers,
    UnknownTransfer,
)
from ledger.models import Transfer
from storage.database import open_database, utcnow

BIG = 10**30  # every amount below is beyond 64 bits


@dataclass
class Ledger:
    url: str
    accounts: Accounts
    transfers: Transfers

    def reopen(self) -> None:
        """A ledger restart: every connection closed, the database opened again."""
        self.accounts.engine.dispose()
        engine = open_database(self.url)
        self.accounts, self.transfers = Accounts(engine), Transfers(engine)

    def funded(self, account_id: str, amount: int) -> str:
        self.accounts.create(account_id)
        if amount:
            self.accounts.credit(account_id, amount, f"fund-{account_id}")
        return account_id

    def money(self, account_id: str) -> tuple[int, int]:
        """(balance, held) of the account, after checking the transfers' invariant on it."""
        self.transfers.check(account_id)
        account = self.accounts.get(account_id)
        return account.balance, account.held

    def rows(self) -> list[TransferRecord]:
        with Session(self.accounts.engine) as session:
            return [TransferRecord.of(r) for r in session.exec(select(Transfer).order_by(Transfer.id)).all()]

    def snapshot(self) -> tuple[list[TransferRecord], list[tuple[str, int, int]]]:
        """Everything a refused operation must leave alone."""
        self.transfers.check_all()
        return self.rows(), [(a.id, a.balance, a.held) for a in self.accounts.list()]


@pytest.fixture()
def ledger(database_url: str) -> Iterator[Ledger]:
    engine = open_database(database_url)
    book = Ledger(database_url, Accounts(engine), Transfers(engine))
    yield book
    book.accounts.engine.dispose()


def refused(book: Ledger, error: type[Exception], call, *args, **kwargs) -> Exception:  # noqa: ANN001
    """Run a call that must be refused with `error` and must store nothing."""
    before = book.snapshot()
    with pytest.raises(error) as raised:
        call(*args, **kwargs)
    assert book.snapshot() == before, "a refused operation stored something"
    return raised.value


def test_a_hold_drawn_from_a_lease_is_posted_and_the_remainder_goes_back_to_the_lease(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 10 * BIG)
    lease = ledger.transfers.lease("lease-1", acme, 6 * BIG, owner="replica-a")
    assert (lease.kind, lease.state, lease.amount, lease.requested, lease.drawn) == (
        LEASE, PENDING, 6 * BIG, 6 * BIG, 0)
    assert ledger.money(acme) == (10 * BIG, 6 * BIG)

    hold = ledger.transfers.hold("req-1", acme, 2 * BIG, lease_id="lease-1")
    assert (hold.kind, hold.state, hold.lease_id, hold.owner) == (HOLD, PENDING, "lease-1", "replica-a")
    assert ledger.transfers.get("lease-1").drawn == 2 * BIG
    assert ledger.money(acme) == (10 * BIG, 6 * BIG), "a hold drawn from a lease does not change held"

    posted = ledger.transfers.post("req-1", BIG + 5)
    assert (posted.state, posted.posted, posted.late) == (POSTED, BIG + 5, False)
    assert ledger.transfers.get("lease-1").drawn == BIG + 5, "the remainder went back to the lease"
    assert ledger.money(acme) == (9 * BIG - 5, 5 * BIG - 5)

    # repeats: the same result, no second effect
    assert ledger.transfers.post("req-1", BIG + 5) == posted
    assert ledger.transfers.hold("req-1", acme, 2 * BIG, lease_id="lease-1") == posted
    assert ledger.transfers.lease("lease-1", acme, 6 * BIG, owner="replica-a") == ledger.transfers.get("lease-1")
    assert ledger.money(acme) == (9 * BIG - 5, 5 * BIG - 5)

    # conflicting repeats name both and change nothing
    conflict = refused(ledger, TransferConflict, ledger.transfers.post, "req-1", BIG + 6)
    assert "charged " + str(BIG + 5) in str(conflict) and "a post of " + str(BIG + 6) in str(conflict)
    refused(ledger, TransferConflict, ledger.transfers.void, "req-1")  # void after post
    refused(ledger, TransferConflict, ledger.transfers.hold, "req-1", acme, 3 * BIG)
    refused(ledger, TransferConflict, ledger.transfers.lease, "req-1", acme, BIG, owner="replica-a")

    closed = ledger.transfers.close_lease("lease-1")
    assert (closed.state, closed.posted) == (POSTED, BIG + 5)
    assert ledger.transfers.close_lease("lease-1") == closed
    assert ledger.money(acme) == (9 * BIG - 5, 0)


def test_void_releases_a_hold_to_where_it_was_reserved_and_repeats_are_no_ops(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 1000)
    ledger.transfers.lease("lease-1", acme, 500, owner="replica-a")
    ledger.transfers.hold("from-lease", acme, 300, lease_id="lease-1")
    ledger.transfers.hold("direct", acme, 200, owner="replica-b")
    assert ledger.money(acme) == (1000, 700)

    voided = ledger.transfers.void("from-lease")
    assert (voided.state, voided.posted) == (VOIDED, 0)
    assert ledger.transfers.get("lease-1").drawn == 0
    assert ledger.money(acme) == (1000, 700), "released back into the lease, which still reserves it"
    assert ledger.transfers.void("from-lease") == voided

    assert ledger.transfers.void("direct").state == VOIDED
    assert ledger.money(acme) == (1000, 500)
    assert ledger.transfers.void("direct").state == VOIDED
    assert ledger.money(acme) == (1000, 500)

    refused(ledger, TransferConflict, ledger.transfers.void, "lease-1")  # a lease is closed, not voided
    refused(ledger, TransferConflict, ledger.transfers.close_lease, "direct")
    refused(ledger, UnknownTransfer, ledger.transfers.void, "ghost")
    refused(ledger, UnknownTransfer, ledger.transfers.close_lease, "ghost")

    # a trace after a void: the response was delivered after all, so it is charged, once, marked late
    posted = ledger.transfers.post("direct", 10)
    assert (posted.state, posted.posted, posted.late) == (POSTED, 10, True)
    assert ledger.transfers.post("direct", 10) == posted
    refused(ledger, TransferConflict, ledger.transfers.void, "direct")  # void after post


def test_expiry_releases_what_pending_transfers_reserve_once(ledger: Ledger) -> None:
    acme, beta = ledger.funded("acme", 1000), ledger.funded("beta", 1000)
    ledger.transfers.lease("lease-1", acme, 500, owner="replica-a", ttl_seconds=60)
    ledger.transfers.hold("drawn", acme, 100, lease_id="lease-1", ttl_seconds=60)
    ledger.transfers.hold("direct", acme, 200, ttl_seconds=60)
    ledger.transfers.hold("long", acme, 50)  # an hour
    ledger.transfers.hold("beta-1", beta, 10, ttl_seconds=60)
    assert ledger.money(acme) == (1000, 750)

    assert ledger.transfers.expire(utcnow()) == Expired(0, 0), "nothing is past its expiry yet"
    later = utcnow() + timedelta(minutes=5)
    assert ledger.transfers.expire(later) == Expired(leases=1, holds=3)
    assert [(r.id, r.state) for r in ledger.rows()] == [
        ("beta-1", EXPIRED), ("direct", EXPIRED), ("drawn", EXPIRED), ("lease-1", EXPIRED), ("long", PENDING)]
    assert ledger.money(acme) == (1000, 50)
    assert ledger.money(beta) == (1000, 0)

    assert ledger.transfers.expire(later) == Expired(0, 0)  # a repeat: no second release
    assert ledger.money(acme) == (1000, 50)
    assert ledger.transfers.void("direct").state == EXPIRED  # nothing reserved: no-ops
    assert ledger.transfers.close_lease("lease-1").state == EXPIRED
    assert ledger.money(acme) == (1000, 50)

    assert ledger.transfers.expire(utcnow() + timedelta(hours=2)) == Expired(0, 1)
    assert ledger.money(acme) == (1000, 0)


def test_a_post_after_expiry_still_charges_once_and_is_marked_late(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 1000)
    ledger.transfers.lease("lease-1", acme, 400, owner="replica-a")
    ledger.transfers.hold("req-1", acme, 300, lease_id="lease-1", ttl_seconds=1)
    assert ledger.transfers.expire(utcnow() + timedelta(seconds=30)) == Expired(0, 1)
    assert ledger.transfers.get("lease-1").drawn == 0 and ledger.money(acme) == (1000, 400)

    late = ledger.transfers.post("req-1", 120)
    assert (late.state, late.posted, late.late) == (POSTED, 120, True)
    assert ledger.money(acme) == (880, 400), "charged off the balance; the lease keeps its reservation"
    assert ledger.transfers.post("req-1", 120) == late
    assert ledger.money(acme) == (880, 400)
    refused(ledger, TransferConflict, ledger.transfers.post, "req-1", 121)


def test_a_post_before_its_hold_creates_it_posted_and_the_hold_report_is_a_no_op(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 1000)
    refused(ledger, UnknownTransfer, ledger.transfers.post, "req-9", 70)  # no account to charge
    refused(ledger, UnknownAccount, ledger.transfers.post, "req-9", 70, "ghost")

    posted = ledger.transfers.post("req-9", 70, acme)
    assert (posted.state, posted.amount, posted.posted, posted.created_by) == (POSTED, 70, 70, "post")
    assert ledger.money(acme) == (930, 0)
    assert ledger.transfers.post("req-9", 70, acme) == posted

    ledger.transfers.lease("lease-1", acme, 500, owner="replica-a")
    assert ledger.transfers.hold("req-9", acme, 400, lease_id="lease-1") == posted  # the late report
    assert ledger.transfers.get("lease-1").drawn == 0
    assert ledger.money(acme) == (930, 500)
    ledger.funded("beta", 0)
    refused(ledger, TransferConflict, ledger.transfers.hold, "req-9", "beta", 400)  # another account
    refused(ledger, TransferConflict, ledger.transfers.post, "req-9", 70, "beta")


def test_a_hold_beyond_its_lease_falls_back_to_the_account_within_the_overdraw_bound(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 400)
    assert ledger.transfers.lease("lease-1", acme, 300, owner="replica-a").amount == 300
    assert ledger.transfers.hold("a", acme, 250, lease_id="lease-1").lease_id == "lease-1"
    b = ledger.transfers.hold("b", acme, 100, lease_id="lease-1")  # 50 undrawn: from the account (100 free)
    assert (b.lease_id, b.under_lease, b.overdraw) == (None, "lease-1", 0)
    assert ledger.money(acme) == (400, 400)

    c = ledger.transfers.hold("c", acme, 150, lease_id="lease-1")  # admitted by the replica: overdraw
    assert (c.lease_id, c.overdraw) == (None, 150)
    assert ledger.money(acme) == (400, 550)
    error = refused(ledger, InsufficientCredit, ledger.transfers.hold, "d", acme, 151, lease_id="lease-1")
    assert (error.needed, error.available) == (151, -150), "150 + 151 would exceed the lease's 300"
    refused(ledger, InsufficientCredit, ledger.transfers.hold, "e", acme, 1)  # no lease: never past available
    refused(ledger, InsufficientCredit, ledger.transfers.hold, "f", acme, 1, lease_id="ghost")  # never existed
    ledger.funded("beta", 10**6)
    ledger.transfers.lease("beta-lease", "beta", 10, owner="replica-a")
    refused(ledger, TransferConflict, ledger.transfers.hold, "g", acme, 1, lease_id="beta-lease")  # other account

    # a closed lease still vouches for requests admitted under it, within the same bound
    ledger.transfers.close_lease("lease-1")
    assert ledger.money(acme) == (400, 500)
    assert ledger.transfers.hold("h", acme, 150, lease_id="lease-1").overdraw == 150
    refused(ledger, InsufficientCredit, ledger.transfers.hold, "i", acme, 1, lease_id="lease-1")
    assert ledger.money(acme) == (400, 650)

    ledger.transfers.post("c", 150)
    ledger.transfers.post("h", 150)
    assert ledger.money(acme) == (100, 350)
    for request in ("a", "b"):
        ledger.transfers.void(request)
    assert ledger.money(acme) == (100, 0)


def test_a_lease_grants_what_is_available_and_refuses_when_nothing_is(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 100)
    granted = ledger.transfers.lease("lease-1", acme, 500, owner="replica-a")
    assert (granted.requested, granted.amount) == (500, 100)
    assert ledger.money(acme) == (100, 100)
    assert ledger.transfers.lease("lease-1", acme, 500, owner="replica-a") == granted  # the first result

    error = refused(ledger, InsufficientCredit, ledger.transfers.lease, "lease-2", acme, 500, owner="replica-b")
    assert (error.needed, error.available) == (500, 0)
    assert ledger.transfers.get("lease-2") is None
    zeta = ledger.funded("zeta", 100)  # a replica spends one lease and returns another: a third is refused
    ledger.transfers.lease("zeta-1", zeta, 10, owner="replica-a")
    ledger.transfers.lease("zeta-2", zeta, 10, owner="replica-a")
    refused(ledger, LeaseOutstanding, ledger.transfers.lease, "zeta-3", zeta, 10, owner="replica-a")
    assert ledger.transfers.lease("zeta-3", zeta, 10, owner="replica-b").amount == 10, "per owner"
    refused(ledger, TransferConflict, ledger.transfers.lease, "lease-1", acme, 400, owner="replica-a")
    refused(ledger, TransferConflict, ledger.transfers.lease, "lease-1", acme, 500, owner="replica-b")
    refused(ledger, UnknownAccount, ledger.transfers.lease, "lease-4", "ghost", 1, owner="replica-a")
    for bad in ({"amount": 0}, {"amount": -1}, {"amount": 1.5}, {"lease_id": ""}, {"lease_id": "x" * 129},
                {"owner": ""}, {"ttl_seconds": 0}):
        kwargs = {"lease_id": "lease-5", "account_id": acme, "amount": 1, "owner": "replica-c"} | bad
        refused(ledger, ValueError, ledger.transfers.lease, **kwargs)

    ledger.transfers.close_lease("lease-1")
    assert ledger.money(acme) == (100, 0)
    assert ledger.transfers.lease("lease-3", acme, 1, owner="replica-a").amount == 1  # the first one is closed


def test_closing_a_lease_leaves_its_pending_holds_to_be_posted_or_voided_on_their_own(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 1000)
    ledger.transfers.lease("lease-1", acme, 500, owner="replica-a")
    ledger.transfers.hold("h1", acme, 100, lease_id="lease-1")
    ledger.transfers.hold("h2", acme, 200, lease_id="lease-1")
    ledger.transfers.hold("h3", acme, 50, lease_id="lease-1")
    ledger.transfers.post("h3", 20)
    assert ledger.money(acme) == (980, 480)

    closed = ledger.transfers.close_lease("lease-1")
    assert (closed.state, closed.drawn, closed.posted) == (POSTED, 320, 320)
    assert ledger.money(acme) == (980, 300), "the undrawn 180 released; the pending holds keep 300"
    assert [ledger.transfers.get(h).state for h in ("h1", "h2")] == [PENDING, PENDING]

    ledger.transfers.post("h1", 40)
    assert ledger.money(acme) == (940, 200), "the remainder leaves held: its lease is no longer pending"
    ledger.transfers.void("h2")
    assert ledger.money(acme) == (940, 0)
    assert ledger.transfers.get("lease-1") == closed


def test_batches_refuse_items_one_by_one_and_a_post_joins_the_callers_transaction(ledger: Ledger) -> None:
    acme, beta = ledger.funded("acme", 1000), ledger.funded("beta", 100)
    results = ledger.transfers.hold_many([
        HoldReport("b1", beta, 60), HoldReport("a1", acme, 500), HoldReport("b2", beta, 60),
        HoldReport("x1", "ghost", 1), HoldReport("a2", acme, 400), HoldReport("a2", acme, 400)])
    assert [type(r).__name__ for r in results] == [
        "TransferRecord", "TransferRecord", "InsufficientCredit", "UnknownAccount", "TransferRecord",
        "TransferRecord"]
    assert results[5] == results[4], "a repeat within a batch"
    assert ledger.transfers.get("b2") is None and ledger.transfers.get("x1") is None
    assert ledger.money(acme) == (1000, 900) and ledger.money(beta) == (100, 60)

    with Session(ledger.accounts.engine) as session:  # the journal's ingest transaction, rolled back
        ledger.transfers.post_many([PostOrder("a1", 100), PostOrder("b1", 60)], session=session)
        session.rollback()
    assert ledger.money(acme) == (1000, 900) and ledger.transfers.get("a1").state == PENDING
    with Session(ledger.accounts.engine) as session:
        results = ledger.transfers.post_many([
            PostOrder("a1", 100), PostOrder("b1", 60), PostOrder("zz", 1), PostOrder("a2", 1, "beta"),
            PostOrder("early", 5, acme), PostOrder("early", 5), PostOrder("a1", 100)], session=session)
        assert [type(r).__name__ for r in results] == [
            "TransferRecord", "TransferRecord", "UnknownTransfer", "TransferConflict",
            "TransferRecord", "TransferRecord", "TransferRecord"]
        assert results[5] == results[4] and results[6] == results[0], "repeats within a batch"
        session.commit()
    assert ledger.money(acme) == (895, 400) and ledger.money(beta) == (40, 0)


def test_a_ledger_restart_loses_nothing(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 10 * BIG)
    ledger.transfers.lease("lease-1", acme, 4 * BIG, owner="replica-a")
    ledger.transfers.hold("r1", acme, BIG, lease_id="lease-1")
    ledger.transfers.hold("r2", acme, 2 * BIG, lease_id="lease-1")
    ledger.transfers.hold("r3", acme, 3 * BIG, ttl_seconds=1)
    ledger.transfers.post("r1", BIG // 2)
    before = ledger.rows()
    assert ledger.money(acme) == (10 * BIG - BIG // 2, 7 * BIG - BIG // 2)

    ledger.reopen()
    assert ledger.rows() == before
    assert ledger.money(acme) == (10 * BIG - BIG // 2, 7 * BIG - BIG // 2)
    ledger.transfers.post("r2", BIG)
    assert ledger.transfers.post("r1", BIG // 2).posted == BIG // 2  # repeats still recognized
    assert ledger.transfers.expire(utcnow() + timedelta(seconds=30)) == Expired(0, 1)
    ledger.transfers.close_lease("lease-1")
    assert ledger.money(acme) == (10 * BIG - BIG // 2 - BIG, 0)
    assert {r.id: r.state for r in ledger.rows()} == {"lease-1": POSTED, "r1": POSTED, "r2": POSTED, "r3": EXPIRED}


def test_concurrent_holds_and_leases_on_one_account_never_take_more_than_it_has(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 1000)
    errors: list[BaseException] = []

    def replica(n: int) -> None:
        try:
            try:
                ledger.transfers.lease(f"lease-{n}", acme, 150, owner=f"replica-{n}")
            except InsufficientCredit:
                pass
            for i in range(5):
                try:
                    ledger.transfers.hold(f"r{n}-{i}", acme, 40)
                except InsufficientCredit:
                    pass
        except BaseException as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=replica, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    balance, held = ledger.money(acme)
    assert balance == 1000 and held <= 1000
    assert held == sum(r.amount for r in ledger.rows() if r.state == PENDING)


def test_the_invariant_check_catches_money_that_moved_outside_the_transfers(ledger: Ledger) -> None:
    acme = ledger.funded("acme", 1000)
    ledger.transfers.lease("lease-1", acme, 500, owner="replica-a")
    ledger.transfers.hold("r1", acme, 100, lease_id="lease-1")
    ledger.transfers.check_all()
    for column, message in (("held", "held 501, transfers and holds reserve 500"),
                            ("balance", "balance 1001, postings and posted holds make 1000")):
        with ledger.accounts.engine.begin() as connection:
            connection.execute(text(f"UPDATE requesteraccount SET {column} = :value WHERE id = 'acme'"),
                               {"value": str(getattr(ledger.accounts.get(acme), column) + 1)})
        with pytest.raises(AssertionError, match=message):
            ledger.transfers.check(acme)
        with ledger.accounts.engine.begin() as connection:
            connection.execute(text(f"UPDATE requesteraccount SET {column} = :value WHERE id = 'acme'"),
                               {"value": str(getattr(ledger.accounts.get(acme), column) - 1)})
    ledger.transfers.check_all()
