"""Requester accounts: prepaid balances that pay for inferences, credits, and private adapters.

Money moves only through the journal: a credit is one balanced entry (`deposits` debited, the
account's `requester:<id>` credited), an inference's entry debits `requester:<id>` by its fee
(ledger/journal/journal.py). The account row carries `balance` (= the sum of those postings) and
`held` (= what its pending leases and holds reserve: ledger/accounts/transfers.py, which checks
both), updated in the same transactions. Every writer of an account takes its row's write lock
first (`lock_account`), so writes to one account are decided one at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Engine, insert, text
from sqlmodel import Session, select

from ledger.models import AdapterAccess, JournalEntry, Posting, RequesterAccount
from registry.contribution_content import checksum_address
from registry.models import Adapter
from storage.amounts import exact_sum
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


# Takes the account row's write lock (a row lock on PostgreSQL, the database's write lock on SQLite)
# so concurrent writers of one account queue up. It writes a non-key column: rewriting the key would
# make SQLite check every referencing table and make PostgreSQL block inserts of rows that reference
# the account.
_LOCK = text("UPDATE requesteraccount SET held = held WHERE id = :id")


def lock_account(session: Session, account_id: str) -> RequesterAccount:
    """The account row, write-locked until the session's transaction ends (UnknownAccount if absent)."""
    if session.execute(_LOCK, {"id": account_id}).rowcount != 1:  # the same lock as the hold path
        raise UnknownAccount(account_id)
    return session.get(RequesterAccount, account_id, populate_existing=True)  # type: ignore[return-value]


class Accounts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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

    # ---- invariants -----------------------------------------------------------------------
    def check(self, account_id: str) -> None:
        """AssertionError unless the balance is the sum of the account's postings (`held` is checked
        against the transfers by `Transfers.check`)."""
        with Session(self.engine) as session:
            account = session.get(RequesterAccount, account_id)
            if account is None:
                raise UnknownAccount(account_id)
            posted = session.exec(select(exact_sum(Posting.amount)).where(
                Posting.account == requester_account(account_id))).one()
        if int(posted or 0) != account.balance:
            raise AssertionError(f"account {account_id}: balance {account.balance} vs postings {posted}")
