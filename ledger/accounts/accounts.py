"""Requester accounts: prepaid balances that pay for inferences, credits, and holds on credit in flight.

Money moves only through the journal: a credit is one balanced entry (`deposits` debited, the
account's `requester:<id>` credited), an inference's entry debits `requester:<id>` by its fee
(ledger/journal/journal.py). The account row carries `balance` (= the sum of those postings) and `held`
(= the sum of its holds), updated in the same transactions, so admitting a request reads one row.

A hold reserves a request's worst-case cost before it reaches the engine; it is shrunk to the actual
cost when the request completes and deleted when the ledger posts the request's trace, in the
posting's transaction. `available = balance - held` never goes below zero through a hold: every hold
takes the account row's write lock first (an UPDATE of the row, which is a row lock on PostgreSQL
and the write lock on SQLite), so concurrent requests on one account are serialized there.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, String, bindparam, delete, insert, text
from sqlmodel import Session, col, func, select
from sqlmodel.sql.sqltypes import UTCDateTime

from ledger.models import AdapterAccess, BalanceHold, JournalEntry, Posting, RequesterAccount
from registry.contribution_content import checksum_address
from registry.models import Adapter
from storage.amounts import Amount, exact_sum
from storage.database import utcnow

ACCOUNT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,47}")
DEPOSITS_ACCOUNT = "deposits"  # the other side of every credit: value that came in from outside
CREDIT, DEPOSIT = "credit", "deposit"  # journal entry kinds that fund an account


REQUESTER_PREFIX = "requester:"


def requester_account(account_id: str) -> str:
    """The journal account of a requester account's prepaid balance."""
    return f"{REQUESTER_PREFIX}{account_id}"


def check_account_id(account_id: str) -> str:
    if not ACCOUNT_ID.fullmatch(account_id):
        raise ValueError(f"account id {account_id!r} must be 1-48 of a-z, 0-9, '.', '_', '-' (starting with a "
                         "letter or digit)")
    return account_id


class UnknownAccount(ValueError):
    def __init__(self, account_id: str) -> None:
        super().__init__(f"no requester account {account_id!r}")
        self.account_id = account_id


class InsufficientCredit(Exception):
    """A hold larger than the account's available balance."""

    def __init__(self, account_id: str, needed: int, available: int) -> None:
        super().__init__(f"account {account_id!r} has {available} available, the request may cost {needed}")
        self.account_id, self.needed, self.available = account_id, needed, available


class CreditConflict(ValueError):
    """The same credit reference was already used for another account or amount."""


@dataclass(frozen=True)
class AccountBalance:
    account_id: str
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True)
class Credited:
    entry_id: int
    created: bool  # False: the reference was credited before (idempotent repeat)


# The hold path's statements, built once. The first takes the account row's write lock (a row lock on
# PostgreSQL, the database's write lock on SQLite) so concurrent holds on one account queue up. It
# writes a non-key column: rewriting the key would make SQLite check every referencing table
# and make PostgreSQL block inserts of rows that reference the account.
_LOCK_SQL = "UPDATE requesteraccount SET held = held WHERE id = :id"
_READ_SQL = "SELECT balance, held FROM requesteraccount WHERE id = :id"
_SET_HELD_SQL = "UPDATE requesteraccount SET held = :held WHERE id = :id"
_INSERT_HOLD_SQL = ("INSERT INTO balancehold (trace_id, account_id, amount, created_at) "
                    "VALUES (:trace_id, :account_id, :amount, :created_at)")
_LOCK = text(_LOCK_SQL)
_READ = text(_READ_SQL).columns(balance=Amount(), held=Amount())
_SET_HELD = text(_SET_HELD_SQL).bindparams(bindparam("held", type_=Amount()))

# PostgreSQL: the check, the row lock, the new `held` and the hold row in one statement (no row comes
# back when the account is unknown or short), in psycopg's parameter style.
_HOLD_IN_ONE_STATEMENT = (
    "WITH taken AS (UPDATE requesteraccount SET held = held + %(amount)s "
    "WHERE id = %(account_id)s AND balance - held >= %(amount)s RETURNING balance, held), "
    "inserted AS (INSERT INTO balancehold (trace_id, account_id, amount, created_at) "
    "SELECT %(trace_id)s, %(account_id)s, %(amount)s, %(created_at)s FROM taken RETURNING trace_id) "
    "SELECT taken.balance, taken.held FROM taken, inserted"
)
_READ_AMOUNTS = "SELECT balance, held FROM requesteraccount WHERE id = %(account_id)s"
_READ_HOLD = text("SELECT account_id, amount FROM balancehold WHERE trace_id = :trace_id").columns(
    account_id=String(), amount=Amount())
_SET_HOLD = text("UPDATE balancehold SET amount = :amount WHERE trace_id = :trace_id").bindparams(
    bindparam("amount", type_=Amount()))


def _locked_amounts(connection: Connection, account_id: str) -> tuple[int, int]:
    """(balance, held) of an account, write-locked until the connection's transaction ends."""
    if connection.execute(_LOCK, {"id": account_id}).rowcount != 1:
        raise UnknownAccount(account_id)
    balance, held = connection.execute(_READ, {"id": account_id}).one()
    return int(balance), int(held)


@contextmanager
def _driver_connection(engine: Engine) -> Iterator[Any]:
    """A pooled connection's own DB-API connection (checked out as usual, pre-ping included).

    The hold runs on it: SQLAlchemy's handling of a statement costs more than SQLite takes to run
    one. A connection PostgreSQL broke is discarded, not returned to the pool."""
    pooled = engine.raw_connection()
    try:
        yield pooled.driver_connection
    except psycopg.OperationalError:
        pooled.invalidate()
        raise
    finally:
        pooled.close()


def _hold_on_sqlite(driver: sqlite3.Connection, values: dict[str, Any], amount: int) -> tuple[int, int]:
    """(balance, held) before the hold; one transaction: lock, read, check, insert the hold, raise `held`."""
    account_id = values["account_id"]
    try:
        if driver.execute(_LOCK_SQL, {"id": account_id}).rowcount != 1:  # opens the transaction
            raise UnknownAccount(account_id)
        balance, held = (int(v) for v in driver.execute(_READ_SQL, {"id": account_id}).fetchone())
        if amount > balance - held:
            raise InsufficientCredit(account_id, amount, balance - held)
        driver.execute(_INSERT_HOLD_SQL, values)
        driver.execute(_SET_HELD_SQL, {"id": account_id, "held": str(held + amount)})  # TEXT, as Amount binds it
        driver.commit()
    except BaseException:
        driver.rollback()
        raise
    return balance, held


def _hold_on_postgresql(driver: psycopg.Connection, values: dict[str, Any], amount: int) -> tuple[int, int]:
    """(balance, held) before the hold, in one statement (autocommit). When it takes nothing, the
    account is read to say why; a credit that arrived in between gets the statement run again."""
    account_id = values["account_id"]
    driver.autocommit = True
    try:
        for _ in range(3):
            taken = driver.execute(_HOLD_IN_ONE_STATEMENT, values).fetchone()
            if taken is not None:
                return int(taken[0]), int(taken[1]) - amount
            found = driver.execute(_READ_AMOUNTS, values).fetchone()
            if found is None:
                raise UnknownAccount(account_id)
            balance, held = int(found[0]), int(found[1])
            if amount > balance - held:
                break
        raise InsufficientCredit(account_id, amount, balance - held)
    finally:
        driver.autocommit = False


def lock_account(session: Session, account_id: str) -> RequesterAccount:
    """The account row, write-locked until the session's transaction ends (UnknownAccount if absent)."""
    if session.execute(_LOCK, {"id": account_id}).rowcount != 1:  # the same lock as the hold path
        raise UnknownAccount(account_id)
    return session.get(RequesterAccount, account_id, populate_existing=True)  # type: ignore[return-value]


class Accounts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect  # the hold binds its values itself, exactly as the columns' types do
        self._bind_amount = Amount().dialect_impl(dialect).bind_processor(dialect)
        self._bind_time = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)

    # ---- accounts -------------------------------------------------------------------------
    def create(self, account_id: str, deposit_address: str | None = None) -> RequesterAccount:
        """A new account with a zero balance (ValueError if the id is taken or malformed)."""
        check_account_id(account_id)
        address = checksum_address(deposit_address) if deposit_address else None
        with Session(self.engine) as session:
            if session.get(RequesterAccount, account_id) is not None:
                raise ValueError(f"account {account_id!r} exists already")
            if address and session.exec(select(RequesterAccount).where(
                    RequesterAccount.deposit_address == address)).first() is not None:
                raise ValueError(f"deposit address {address} belongs to another account")
            account = RequesterAccount(id=account_id, deposit_address=address)
            session.add(account)
            session.commit()
            session.refresh(account)
            return account

    def get(self, account_id: str) -> RequesterAccount:
        with Session(self.engine) as session:
            account = session.get(RequesterAccount, account_id)
        if account is None:
            raise UnknownAccount(account_id)
        return account

    def list(self) -> list[RequesterAccount]:
        with Session(self.engine) as session:
            return list(session.exec(select(RequesterAccount).order_by(RequesterAccount.id)).all())

    def balance(self, account_id: str) -> AccountBalance:
        account = self.get(account_id)
        return AccountBalance(account.id, account.balance, account.held)

    # ---- private adapters -----------------------------------------------------------------
    def share_adapter(self, adapter: str, account_id: str) -> list[str]:
        """Make `adapter` private to its shared accounts (this one added); the accounts it is shared with."""
        with Session(self.engine) as session:
            if session.get(Adapter, adapter) is None:
                raise ValueError(f"no registered adapter {adapter!r}")
            if session.get(RequesterAccount, account_id) is None:
                raise UnknownAccount(account_id)
            if session.get(AdapterAccess, (adapter, account_id)) is None:
                session.add(AdapterAccess(adapter_name=adapter, account_id=account_id))
                session.commit()
            return list(session.exec(select(AdapterAccess.account_id).where(
                AdapterAccess.adapter_name == adapter).order_by(AdapterAccess.account_id)).all())

    def unshare_adapter(self, adapter: str, account_id: str) -> list[str]:
        """Take an account off a private adapter; with none left the adapter is public again."""
        with Session(self.engine) as session:
            row = session.get(AdapterAccess, (adapter, account_id))
            if row is not None:
                session.delete(row)
                session.commit()
            return list(session.exec(select(AdapterAccess.account_id).where(
                AdapterAccess.adapter_name == adapter).order_by(AdapterAccess.account_id)).all())

    # ---- credit ---------------------------------------------------------------------------
    def credit(self, account_id: str, amount: int, ref: str, *, kind: str = CREDIT,
               session: Session | None = None) -> Credited:
        """Credit `amount` base units once per (`kind`, `ref`); a repeat returns the first entry.

        With `session`, the credit joins that transaction (the caller commits); otherwise it commits.
        """
        if amount <= 0:
            raise ValueError("a credit must be a positive number of base units")
        if not ref or len(ref) > 128:
            raise ValueError("a credit needs a reference of 1-128 characters (it makes the credit idempotent)")
        if session is None:
            with Session(self.engine) as own:
                credited = self.credit(account_id, amount, ref, kind=kind, session=own)
                own.commit()
                return credited
        account = lock_account(session, account_id)
        existing = session.exec(select(JournalEntry).where(JournalEntry.kind == kind, JournalEntry.ref == ref)).first()
        if existing is not None:
            postings = {p.account: p.amount for p in session.exec(select(Posting).where(
                Posting.entry_id == existing.id)).all()}
            if postings.get(requester_account(account_id)) != amount:
                raise CreditConflict(f"{kind} {ref!r} was already credited with other terms: {postings}")
            return Credited(existing.id, False)  # type: ignore[arg-type]
        entry_id = session.execute(insert(JournalEntry).returning(JournalEntry.id),  # type: ignore[arg-type]
                                   [{"kind": kind, "ref": ref, "created_at": utcnow()}]).scalar_one()
        session.execute(insert(Posting.__table__), [  # type: ignore[attr-defined]
            {"entry_id": entry_id, "account": DEPOSITS_ACCOUNT, "role": "funding", "amount": -amount},
            {"entry_id": entry_id, "account": requester_account(account_id), "role": "requester", "amount": amount},
        ])
        account.balance += amount
        session.add(account)
        return Credited(entry_id, True)

    # ---- holds ----------------------------------------------------------------------------
    def hold(self, trace_id: str, account_id: str, amount: int) -> AccountBalance:
        """Reserve `amount` for request `trace_id` (InsufficientCredit when it exceeds what is available).

        On the request path, on the driver's own connection: one statement on PostgreSQL, one short
        transaction of four statements on SQLite (values bound as the columns' types bind them)."""
        if amount < 0:
            raise ValueError("a hold cannot be negative")
        values = {"trace_id": trace_id, "account_id": account_id, "amount": self._bind_amount(amount),
                  "created_at": self._bind_time(utcnow())}
        hold_on = _hold_on_postgresql if self.engine.dialect.name == "postgresql" else _hold_on_sqlite
        try:
            with _driver_connection(self.engine) as driver:
                balance, held = hold_on(driver, values, amount)
        except (psycopg.IntegrityError, sqlite3.IntegrityError):
            raise ValueError(f"request {trace_id!r} already holds credit") from None
        return AccountBalance(account_id, balance, held + amount)

    def shrink_hold(self, trace_id: str, amount: int) -> None:
        """The request finished: keep only its actual cost held until the ledger posts it (never grows)."""
        amount = max(amount, 0)
        with self.engine.begin() as connection:
            found = connection.execute(_READ_HOLD, {"trace_id": trace_id}).first()
            if found is None or amount >= found.amount:
                return
            _, held = _locked_amounts(connection, found.account_id)
            current = connection.execute(_READ_HOLD, {"trace_id": trace_id}).first()  # under the lock now
            if current is None or amount >= current.amount:
                return
            connection.execute(_SET_HOLD, {"trace_id": trace_id, "amount": amount})
            connection.execute(_SET_HELD, {"id": found.account_id, "held": held - (current.amount - amount)})

    def release(self, trace_id: str) -> None:
        """Drop a request's hold (it never reached the engine, or its trace will not be billed)."""
        with Session(self.engine) as session:
            release_holds(session, [trace_id])
            session.commit()

    def release_stale_holds(self, older_than_seconds: float) -> int:
        """Release holds older than this (a request that never ran, or a trace that was lost); how many."""
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        with Session(self.engine) as session:
            stale = list(session.exec(select(BalanceHold.trace_id).where(BalanceHold.created_at < cutoff)).all())
            if stale:
                release_holds(session, stale)
                session.commit()
        return len(stale)

    # ---- invariants -----------------------------------------------------------------------
    def check(self, account_id: str) -> None:
        """Raise AssertionError unless balance = sum of postings and held = sum of holds."""
        with Session(self.engine) as session:
            account = session.get(RequesterAccount, account_id)
            if account is None:
                raise UnknownAccount(account_id)
            posted = session.exec(select(exact_sum(Posting.amount)).where(
                Posting.account == requester_account(account_id))).one()
            held = session.exec(select(exact_sum(BalanceHold.amount)).where(
                BalanceHold.account_id == account_id)).one()
            holds = session.exec(select(func.count()).select_from(BalanceHold).where(
                BalanceHold.account_id == account_id)).one()
        if int(posted or 0) != account.balance or int(held or 0) != account.held:
            raise AssertionError(f"account {account_id}: balance {account.balance} vs postings {posted}, "
                                 f"held {account.held} vs {holds} holds summing to {held}")


def release_holds(session: Session, trace_ids: list[str]) -> None:
    """Delete the holds of these requests and take them off their accounts' `held` (caller commits)."""
    settle_requests(session, {}, trace_ids)


def settle_requests(session: Session, charges: dict[str, int], trace_ids: list[str]) -> None:
    """The ledger posted these requests: take `charges` (account → fees) off the balances and drop
    the requests' holds, locking each account once, in id order (no deadlock between ingest streams)."""
    holds = session.exec(select(BalanceHold).where(col(BalanceHold.trace_id).in_(trace_ids))).all() if trace_ids \
        else []
    held: dict[str, int] = {}
    for hold in holds:
        held[hold.account_id] = held.get(hold.account_id, 0) + hold.amount
    for account_id in sorted(held.keys() | charges.keys()):
        account = lock_account(session, account_id)
        account.held -= held.get(account_id, 0)
        account.balance -= charges.get(account_id, 0)
        session.add(account)
    if holds:
        session.execute(delete(BalanceHold).where(col(BalanceHold.trace_id).in_([h.trace_id for h in holds])))
