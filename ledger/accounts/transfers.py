"""Two-phase transfers on requester accounts: credit leased to engine replicas, and request holds.

The ledger is to be the only writer of money state. An engine replica **leases** credit from an
account in chunks, admits requests locally against its lease (no call to the ledger on the request
path), reports each request's worst-case cost as a **hold** in batches, and the ledger **posts** the
hold when the request's attribution trace is ingested. The model is TigerBeetle's two-phase
transfer: pending, then posted, voided or expired. One table (`Transfer` in ledger/models.py), one
state machine keyed by the transfer id: a lease id chosen by the replica, or the request (trace) id.

States and transitions::

                     post (a hold: its charge off the balance), close_lease (a lease)
               ┌───────────────────────────────────────────────────────► posted
    lease ──┐  │                                                            ▲
            ├─► pending ── void (a hold) ──────────────────────► voided     │ post (late: an expired
    hold  ──┘  │                                                            │ hold is still charged,
               └── expire(now) (past expires_at) ──────────────► expired ───┘ once)

    post of an unknown id ───────────────────────────────────────► posted (created posted: the
                                                                   trace came before the hold report)

Every state but pending is final, except that a late post turns an expired or voided hold into a posted one.
Nothing is deleted: every transfer stays a row, so a restart of the ledger loses nothing and
continues where it stopped (expiry is driven by the stored `expires_at`, by whoever calls `expire`).

Where each amount goes (`balance` and `held` are the account row's columns; available = balance - held):

- `lease(id, account, amount, owner)`: grants min(amount, available); `held += granted`. Nothing
  available (available <= 0): InsufficientCredit(needed=amount, available), nothing stored. A
  replica has at most two pending leases per account: the one it spends and the one it is
  returning once that one's holds are reported (a third is refused: LeaseOutstanding).
- `hold(id, account, amount, lease_id)`: drawn from the lease when it is pending and its undrawn part
  (amount - drawn) covers it: `lease.drawn += amount`, `held` unchanged (the lease already reserved
  it). Otherwise straight from the account: `held += amount`, refused (InsufficientCredit, nothing
  stored) when it exceeds available, unless the **bounded overdraw** rule below admits it.
- `post(id, charge)`: `balance -= charge`. The hold's reservation is released: if it was drawn from
  a still-pending lease, the part charged leaves `held` and the remainder (amount - charge) goes back
  to the lease (`lease.drawn -= remainder`); otherwise the whole amount leaves `held`. A charge above
  the hold (a price changed in between) is still charged in full: the response was delivered. A post
  of an expired hold charges the balance only (its reservation was released at expiry) and sets
  `late`. A post of an unknown id creates the hold already posted (amount = posted = charge; with a
  charge of 0 nothing is recorded); a later hold report with that id is then a no-op. A post of a
  voided hold charges like a late one (the response was delivered after all).
- `void(id)`: releases a pending hold's amount by the same rule (back to a pending lease, else off
  `held`).
- `close_lease(id)`: the replica returns its lease: `held -= amount - drawn`; the lease is posted
  with posted = drawn. Holds drawn from it stay pending on their own, and from then on release
  off `held` (their lease is no longer pending).
- `expire(now)`: every pending transfer with expires_at < now becomes expired: a lease releases its
  undrawn part, a hold its amount (destination rule above). Holds are expired before leases.
  "Pending" is the stored state: a lease past its `expires_at` still lends until `expire` runs.

A lease's `drawn` is thus what its pending holds reserve plus what was charged to holds drawn from
it while it was pending; it never exceeds its `amount`.

So at every commit, for each account (checked by `Transfers.check`, which the tests call after
every step): ``held = sum over pending leases of (amount - drawn) + sum over pending holds not
drawn from a pending lease of amount``, and the balance moves only by credits and posts:
``balance = sum of postings on requester:<id>`` (the journal posts a trace's hold in the trace's own
ingest transaction, ledger/journal/journal.py; a posted hold without a journal entry is counted
off the balance too, for holds posted directly as the tests do).

**Bounded overdraw.** A replica admits a request under its lease before the ledger sees the hold,
and the ledger's view of the lease lags (remainders return to it only when traces are posted). A hold
that names a lease (`lease_id`, of the same account, in any state) but cannot be drawn from it may
therefore exceed the account's available credit: the replica already admitted it. Its overdraw
(amount - max(available, 0)) is recorded on the hold, and the pending overdraw of all holds reported
under one lease is capped at that lease's amount (beyond it: InsufficientCredit). A hold naming no
lease, or a lease that never existed, is never allowed past the available credit. The bound:
the overdraw of an account is at most the sum, over its leases with overdrawn holds still pending,
of each lease's amount. A replica spends from one lease per account at a time and closes the one
it replaced only after reporting that one's holds (lease, admit, report, close), so overdrawn holds
come from the lease it spends (what a finished request did not cost comes back to the replica at
once, to the ledger only when the trace is posted) or from a lease that expired under them: about
one lease per replica; a replica that closes a lease and takes another before the first one's
overdrawn holds are posted can have both counted, for that while. The
ledger trusts the lease a hold names (the replicas are the operator's own processes).
Posts are never refused for want of credit: a late post, or a charge above its hold, can take
the balance itself below zero (the compute was spent; accounts.py documents the same for late traces).

Repeats are idempotent: the same operation with the same terms (lease: account, requested amount,
owner; hold: account, amount; post: charge; void and close: the id) returns the transfer as stored
and changes nothing; a conflicting one (same id with another kind, account or amount, a post with
another charge, a void after a post) raises TransferConflict naming both.
A void of an expired hold and a close of an expired lease are no-ops (nothing is reserved).

Concurrency: every operation runs in one transaction and first takes the account row's write lock
(`lock_account`, the lock of accounts.py's hold path), so operations on one account are decided one
at a time; bulk forms lock every account they touch first, in id order (no deadlock between
batches). Amounts are integer base units (Python ints, `Amount` columns: beyond 64 bits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from ledger.accounts.accounts import InsufficientCredit, UnknownAccount, lock_account, requester_account
from ledger.models import JournalEntry, Posting, RequesterAccount, Transfer
from storage.amounts import exact_sum
from storage.database import utcnow

LEASE, HOLD = "lease", "hold"
PENDING, POSTED, VOIDED, EXPIRED = "pending", "posted", "voided", "expired"
POST = "post"  # `created_by` of a hold whose post arrived before its report
INFERENCE_ENTRY = "inference"  # the journal's entry kind for a trace (ref = trace id = hold id)
DEFAULT_LEASE_TTL_SECONDS = 300.0
MAX_PENDING_LEASES_PER_OWNER = 2  # the lease a replica spends and the one it is returning
DEFAULT_HOLD_TTL_SECONDS = 3600.0  # no request runs this long
MAX_ID_LENGTH = 128

T = TypeVar("T")


class TransferConflict(ValueError):
    """The same transfer id with other terms than the stored transfer's (nothing was changed)."""

    def __init__(self, transfer_id: str, stored: str, asked: str) -> None:
        super().__init__(f"transfer {transfer_id!r} is {stored}; refused: {asked}")
        self.transfer_id, self.stored, self.asked = transfer_id, stored, asked


class LeaseOutstanding(TransferConflict):
    """A replica asked for a second pending lease on one account (close the first one)."""


class UnknownTransfer(ValueError):
    def __init__(self, transfer_id: str) -> None:
        super().__init__(f"no transfer {transfer_id!r}")
        self.transfer_id = transfer_id


@dataclass(frozen=True)
class TransferRecord:
    """A transfer as stored (what every operation returns)."""

    id: str
    kind: str
    account_id: str
    lease_id: str | None
    under_lease: str | None
    requested: int
    amount: int
    drawn: int
    posted: int
    overdraw: int
    state: str
    created_by: str
    late: bool
    owner: str
    expires_at: datetime
    created_at: datetime
    resolved_at: datetime | None

    @classmethod
    def of(cls, row: Transfer) -> TransferRecord:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class HoldReport:
    """One hold of a replica's batch (`Transfers.hold_many`)."""

    id: str
    account_id: str
    amount: int
    lease_id: str | None = None
    owner: str | None = None
    ttl_seconds: float = DEFAULT_HOLD_TTL_SECONDS


@dataclass(frozen=True)
class PostOrder:
    """One post of a batch (`Transfers.post_many`): the request's charge, and its account for an unknown id."""

    id: str
    charge: int
    account_id: str | None = None


@dataclass(frozen=True)
class Expired:
    leases: int
    holds: int


def _check_id(transfer_id: str, what: str = "transfer id") -> str:
    if not isinstance(transfer_id, str) or not 1 <= len(transfer_id) <= MAX_ID_LENGTH:
        raise ValueError(f"a {what} is 1-{MAX_ID_LENGTH} characters, got {transfer_id!r}")
    return transfer_id


def _check_amount(amount: int, what: str) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError(f"{what} must be an integer number of base units >= 0, got {amount!r}")
    return amount


def _check_ttl(ttl_seconds: float) -> timedelta:
    if not ttl_seconds > 0:
        raise ValueError(f"a ttl must be positive, got {ttl_seconds!r}")
    return timedelta(seconds=ttl_seconds)


def _describe(row: Transfer) -> str:
    terms = f"a {row.state} {row.kind} of {row.amount} on account {row.account_id!r}"
    if row.kind == LEASE:
        terms += f" (asked {row.requested}, owner {row.owner!r})"
    if row.state == POSTED and row.kind == HOLD:
        terms += f" charged {row.posted}"
    return terms


# ---- the transitions: each runs with the account row locked, checks everything, then writes --------

def _pending_lease(session: Session, hold: Transfer) -> Transfer | None:
    """The lease a hold was drawn from, if that lease is still pending (else None)."""
    if hold.lease_id is None:
        return None
    lease = session.get(Transfer, hold.lease_id)
    return lease if lease is not None and lease.state == PENDING else None


def _release_hold(session: Session, account: RequesterAccount, hold: Transfer, kept: int) -> None:
    """Release a pending hold's reservation, `kept` of it (≤ amount) having been charged: back to its
    lease while that is pending (the charged part leaves `held`), else all of it off `held`."""
    lease = _pending_lease(session, hold)
    if lease is not None:
        lease.drawn -= hold.amount - kept
        account.held -= kept
        session.add(lease)
    else:
        account.held -= hold.amount


def _lease(session: Session, account: RequesterAccount, lease_id: str, amount: int, owner: str,
           ttl: timedelta, now: datetime) -> Transfer:
    row = session.get(Transfer, lease_id)
    if row is not None:
        if (row.kind, row.account_id, row.requested, row.owner) != (LEASE, account.id, amount, owner):
            raise TransferConflict(lease_id, _describe(row),
                                   f"a lease of {amount} on account {account.id!r} for {owner!r}")
        return row
    outstanding = session.exec(select(Transfer).where(
        Transfer.account_id == account.id, Transfer.kind == LEASE, Transfer.state == PENDING,
        Transfer.owner == owner).order_by(Transfer.created_at)).all()
    if len(outstanding) >= MAX_PENDING_LEASES_PER_OWNER:
        raise LeaseOutstanding(outstanding[0].id, _describe(outstanding[0]),
                               f"lease {lease_id!r}: {owner!r} holds {len(outstanding)} pending leases on "
                               f"{account.id!r} already")
    available = account.balance - account.held
    if available <= 0:
        raise InsufficientCredit(account.id, amount, available)
    granted = min(amount, available)
    account.held += granted
    row = Transfer(id=lease_id, kind=LEASE, account_id=account.id, requested=amount, amount=granted,
                   state=PENDING, created_by=LEASE, owner=owner, expires_at=now + ttl, created_at=now)
    session.add_all([account, row])
    return row


def _hold(session: Session, account: RequesterAccount, report: HoldReport, ttl: timedelta,
          now: datetime, rows: dict[str, Transfer]) -> Transfer:
    """`rows`: the transfers this batch may touch, loaded at once (and the ones it creates)."""
    row = rows.get(report.id)
    asked = f"a hold of {report.amount} on account {account.id!r}"
    if row is not None:
        if row.kind != HOLD or row.account_id != account.id:
            raise TransferConflict(report.id, _describe(row), asked)
        if row.created_by == POST:
            return row  # its trace was posted first: the report comes too late to reserve anything
        if row.requested != report.amount:
            raise TransferConflict(report.id, _describe(row), asked)
        return row
    lease = rows.get(report.lease_id) if report.lease_id is not None else None
    if lease is not None and (lease.kind != LEASE or lease.account_id != account.id):
        raise TransferConflict(lease.id, _describe(lease), f"the lease of hold {report.id!r} on account "
                                                           f"{account.id!r}")
    drawn_from, overdraw = None, 0
    if lease is not None and lease.state == PENDING and report.amount <= lease.amount - lease.drawn:
        drawn_from = lease.id
        lease.drawn += report.amount
        session.add(lease)
    else:
        available = account.balance - account.held
        if report.amount > available:
            if lease is None:
                raise InsufficientCredit(account.id, report.amount, available)
            overdraw = report.amount - max(available, 0)
            session.flush()  # the batch's earlier holds count too
            already = session.exec(select(exact_sum(Transfer.overdraw)).where(
                Transfer.under_lease == lease.id, Transfer.kind == HOLD, Transfer.state == PENDING)).one()
            if int(already or 0) + overdraw > lease.amount:  # the bound: one lease's worth per lease
                raise InsufficientCredit(account.id, report.amount, available)
        account.held += report.amount
        session.add(account)
    owner = report.owner if report.owner is not None else (lease.owner if lease is not None else "")
    row = Transfer(id=report.id, kind=HOLD, account_id=account.id, lease_id=drawn_from,
                   under_lease=report.lease_id, requested=report.amount, amount=report.amount,
                   overdraw=overdraw, state=PENDING, created_by=HOLD, owner=owner, expires_at=now + ttl,
                   created_at=now)
    session.add(row)
    rows[row.id] = row
    return row


def _post(session: Session, account: RequesterAccount, order: PostOrder, now: datetime) -> Transfer:
    row = session.get(Transfer, order.id)
    charge = order.charge
    asked = f"a post of {charge}"
    if row is None:  # the trace came before the hold report: created posted
        row = Transfer(id=order.id, kind=HOLD, account_id=account.id, requested=charge, amount=charge,
                       posted=charge, state=POSTED, created_by=POST, expires_at=now, created_at=now,
                       resolved_at=now)
        account.balance -= charge
        session.add_all([account, row])
        return row
    if row.kind != HOLD or row.account_id != account.id:
        raise TransferConflict(order.id, _describe(row), f"{asked} on account {account.id!r}")
    if row.state == POSTED:
        if row.posted != charge:
            raise TransferConflict(order.id, _describe(row), asked)
        return row
    if row.state == PENDING:
        _release_hold(session, account, row, min(charge, row.amount))
    else:  # expired or voided: its reservation was released then; the delivered response is billed all the same
        row.late = True
    account.balance -= charge
    row.posted, row.state, row.resolved_at = charge, POSTED, now
    session.add_all([account, row])
    return row


def _void(session: Session, account: RequesterAccount, row: Transfer, now: datetime) -> Transfer:
    if row.kind != HOLD or row.state == POSTED:
        raise TransferConflict(row.id, _describe(row), "a void")
    if row.state == PENDING:
        _release_hold(session, account, row, 0)
        row.state, row.resolved_at = VOIDED, now
        session.add_all([account, row])
    return row  # voided already, or expired: nothing is reserved


def _close_lease(session: Session, account: RequesterAccount, row: Transfer, now: datetime) -> Transfer:
    if row.kind != LEASE:
        raise TransferConflict(row.id, _describe(row), "a close of a lease")
    if row.state == PENDING:
        account.held -= row.amount - row.drawn
        row.posted, row.state, row.resolved_at = row.drawn, POSTED, now
        session.add_all([account, row])
    return row  # closed already, or expired: nothing is reserved


def _expire(session: Session, account: RequesterAccount, row: Transfer, now: datetime) -> None:
    if row.kind == HOLD:
        _release_hold(session, account, row, 0)
    else:
        account.held -= row.amount - row.drawn
    row.state, row.resolved_at = EXPIRED, now
    session.add_all([account, row])


def _lock_accounts(session: Session, account_ids: set[str]) -> dict[str, RequesterAccount]:
    """Write-lock these accounts in id order (no deadlock between batches); their rows, current."""
    session.flush()  # lock_account re-reads the row: nothing of this session's may be pending
    return {account_id: lock_account(session, account_id) for account_id in sorted(account_ids)}


def _stored_accounts(session: Session, transfer_ids: Sequence[str]) -> dict[str, str]:
    """transfer id → account id of the stored ones (a plain read: no row is loaded before its lock)."""
    if not transfer_ids:
        return {}
    return dict(session.exec(select(Transfer.id, Transfer.account_id).where(
        col(Transfer.id).in_(list(set(transfer_ids))))).all())


class Transfers:
    """The ledger's two-phase transfers (see the module docstring for the design)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _transaction(self, work: Callable[[Session], T], session: Session | None = None) -> T:
        """Run `work` in the caller's session (the caller commits) or in its own transaction."""
        if session is not None:
            return work(session)
        with Session(self.engine, expire_on_commit=False) as own:
            result = work(own)
            own.commit()
            return result

    # ---- reads ----------------------------------------------------------------------------
    def get(self, transfer_id: str) -> TransferRecord | None:
        with Session(self.engine) as session:
            row = session.get(Transfer, transfer_id)
            return TransferRecord.of(row) if row is not None else None

    def list(self, account_id: str) -> list[TransferRecord]:
        with Session(self.engine) as session:
            rows = session.exec(select(Transfer).where(Transfer.account_id == account_id).order_by(
                Transfer.created_at, Transfer.id)).all()
            return [TransferRecord.of(row) for row in rows]

    # ---- leases ---------------------------------------------------------------------------
    def lease(self, lease_id: str, account_id: str, amount: int, owner: str,
              ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS) -> TransferRecord:
        """Reserve up to `amount` of the account's available credit for replica `owner`; the lease as
        stored (its `amount` is what was granted). InsufficientCredit when nothing is available."""
        _check_id(lease_id, "lease id")
        _check_id(owner, "lease owner")
        if _check_amount(amount, "a lease") == 0:
            raise ValueError("a lease must be of a positive amount")
        ttl = _check_ttl(ttl_seconds)

        def work(session: Session) -> TransferRecord:
            account = _lock_accounts(session, {account_id})[account_id]
            return TransferRecord.of(_lease(session, account, lease_id, amount, owner, ttl, utcnow()))

        return self._transaction(work)

    def close_lease(self, lease_id: str) -> TransferRecord:
        """The replica returns its lease: the undrawn part is released, the lease posted (posted = drawn)."""
        return self._by_id(lease_id, _close_lease)

    # ---- holds ----------------------------------------------------------------------------
    def hold(self, hold_id: str, account_id: str, amount: int, lease_id: str | None = None, *,
             owner: str | None = None, ttl_seconds: float = DEFAULT_HOLD_TTL_SECONDS) -> TransferRecord:
        """Reserve a request's worst-case cost, from its lease when it can (InsufficientCredit when refused)."""
        result = self.hold_many([HoldReport(hold_id, account_id, amount, lease_id, owner, ttl_seconds)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def hold_many(self, reports: Sequence[HoldReport]) -> list[TransferRecord | Exception]:
        """A replica's batch of hold reports in one transaction: one result per report, in order; a
        refused report's result is its error (InsufficientCredit, TransferConflict, UnknownAccount),
        and nothing of it is stored. Malformed reports raise ValueError before anything is done."""
        for report in reports:
            _check_id(report.id, "hold id")
            _check_amount(report.amount, "a hold")
            _check_ttl(report.ttl_seconds)
            if report.lease_id is not None:
                _check_id(report.lease_id, "lease id")

        def work(session: Session) -> list[TransferRecord | Exception]:
            accounts = self._lock_known(session, {r.account_id for r in reports})
            wanted = {r.id for r in reports} | {r.lease_id for r in reports if r.lease_id is not None}
            rows = {row.id: row for row in session.exec(select(Transfer).where(col(Transfer.id).in_(list(wanted))))}
            now, results = utcnow(), list[TransferRecord | Exception]()
            with session.no_autoflush:  # one read above, the writes at commit: a batch costs a few round trips
                for report in reports:
                    account = accounts.get(report.account_id)
                    try:
                        if account is None:
                            raise UnknownAccount(report.account_id)
                        row = _hold(session, account, report, _check_ttl(report.ttl_seconds), now, rows)
                        results.append(TransferRecord.of(row))
                    except (InsufficientCredit, TransferConflict, UnknownAccount) as refused:
                        results.append(refused)
            return results

        return self._transaction(work)

    def void(self, hold_id: str) -> TransferRecord:
        """Release a pending hold (the request never ran, or will not be billed)."""
        return self._by_id(hold_id, _void)

    # ---- posts ----------------------------------------------------------------------------
    def post(self, hold_id: str, charge: int, account_id: str | None = None, *,
             session: Session | None = None) -> TransferRecord:
        """The request's trace was ingested: charge it and release its hold. An unknown id needs
        `account_id` and is created posted. With `session`, joins the caller's transaction (the caller
        commits; errors are raised and the caller should roll back)."""
        result = self.post_many([PostOrder(hold_id, charge, account_id)], session=session)[0]
        if isinstance(result, Exception):
            raise result
        if result is None:
            raise UnknownTransfer(hold_id)
        return result

    def charge(self, session: Session, account_id: str, amount: int) -> None:
        """Take `amount` off the balance outside any transfer (in the caller's transaction): for a
        trace whose post was refused, so the balance still matches the journal."""
        _lock_accounts(session, {account_id})[account_id].balance -= amount

    def post_many(self, orders: Sequence[PostOrder], *,
                  session: Session | None = None) -> list[TransferRecord | Exception | None]:
        """Posts in one transaction (the caller's with `session`), accounts locked in id order: one
        result per order, a refused one's result being its error (nothing of it stored), None for a
        charge of 0 with no hold (nothing to record)."""
        for order in orders:
            _check_id(order.id, "hold id")
            _check_amount(order.charge, "a charge")

        def work(session: Session) -> list[TransferRecord | Exception | None]:
            account_of = _stored_accounts(session, [o.id for o in orders])
            for order in orders:  # an id posted twice in one batch: the second needs no account
                if order.account_id is not None:
                    account_of.setdefault(order.id, order.account_id)
            wanted = {o.account_id for o in orders if o.account_id is not None} | set(account_of.values())
            accounts = self._lock_known(session, wanted)
            now, results = utcnow(), list[TransferRecord | Exception | None]()
            for order in orders:
                if order.charge == 0 and order.id not in account_of:
                    results.append(None)  # nothing was held and nothing is charged: no row
                    continue
                try:
                    account_id = order.account_id or account_of.get(order.id)
                    if account_id is None:
                        raise UnknownTransfer(order.id)
                    if account_id not in accounts:
                        raise UnknownAccount(account_id)
                    results.append(TransferRecord.of(_post(session, accounts[account_id], order, now)))
                except (TransferConflict, UnknownTransfer, UnknownAccount) as refused:
                    results.append(refused)
            return results

        return self._transaction(work, session)

    # ---- expiry ---------------------------------------------------------------------------
    def expire(self, now: datetime | None = None) -> Expired:
        """Expire every pending transfer past its `expires_at`, releasing what it reserves."""
        now = now or utcnow()
        overdue = (Transfer.state == PENDING, Transfer.expires_at < now)

        def work(session: Session) -> Expired:
            account_ids = set(session.exec(select(Transfer.account_id).where(*overdue).distinct()).all())
            if not account_ids:
                return Expired(0, 0)
            accounts = _lock_accounts(session, account_ids)
            rows = session.exec(select(Transfer).where(*overdue, col(Transfer.account_id).in_(account_ids))).all()
            rows = sorted(rows, key=lambda r: (r.kind != HOLD, r.account_id, r.id))  # holds first
            for row in rows:
                _expire(session, accounts[row.account_id], row, now)
            holds = sum(1 for row in rows if row.kind == HOLD)
            return Expired(leases=len(rows) - holds, holds=holds)

        return self._transaction(work)

    # ---- invariants -----------------------------------------------------------------------
    def check(self, account_id: str) -> None:
        """AssertionError unless the account's `held` and `balance` are what its transfers say."""
        with Session(self.engine) as session:
            account = session.get(RequesterAccount, account_id)
            if account is None:
                raise UnknownAccount(account_id)
            rows = {r.id: r for r in session.exec(select(Transfer).where(Transfer.account_id == account_id)).all()}
            postings = int(session.exec(select(exact_sum(Posting.amount)).where(
                Posting.account == requester_account(account_id))).one() or 0)
            posted_holds = [r for r in rows.values() if r.kind == HOLD and r.state == POSTED]
            journaled = set(session.exec(select(JournalEntry.ref).where(
                JournalEntry.kind == INFERENCE_ENTRY,
                col(JournalEntry.ref).in_([r.id for r in posted_holds]))).all()) if posted_holds else set()
        problems = []
        held = 0
        for row in rows.values():
            if row.kind not in (LEASE, HOLD) or row.state not in (PENDING, POSTED, VOIDED, EXPIRED):
                problems.append(f"{row.id}: kind {row.kind!r}, state {row.state!r}")
            if min(row.amount, row.drawn, row.posted, row.overdraw) < 0:
                problems.append(f"{row.id}: a negative amount")
            if row.state == PENDING:
                held += row.amount - row.drawn if row.kind == LEASE else row.amount
            if row.kind == LEASE:
                drawn_pending = sum(h.amount for h in rows.values()
                                    if h.lease_id == row.id and h.state == PENDING)
                if row.drawn > row.amount or (row.state == PENDING and row.drawn < drawn_pending):
                    problems.append(f"lease {row.id}: drawn {row.drawn} of {row.amount}, pending holds "
                                    f"drawn from it {drawn_pending}")
                if row.state == POSTED and row.posted > row.amount:
                    problems.append(f"lease {row.id}: posted {row.posted} of {row.amount}")
                overdrawn = sum(h.overdraw for h in rows.values() if h.under_lease == row.id and h.state == PENDING)
                if overdrawn > row.amount:
                    problems.append(f"lease {row.id}: pending overdraw {overdrawn} beyond its {row.amount}")
            elif row.lease_id is not None and (row.lease_id not in rows or rows[row.lease_id].kind != LEASE):
                problems.append(f"hold {row.id}: drawn from {row.lease_id!r}, not a lease of this account")
        if held != account.held:
            problems.append(f"held {account.held}, transfers and holds reserve {held}")
        balance = postings - sum(r.posted for r in posted_holds if r.id not in journaled)
        if balance != account.balance:
            problems.append(f"balance {account.balance}, postings and posted holds make {balance}")
        if problems:
            raise AssertionError(f"account {account_id}: " + "; ".join(problems))

    def check_all(self) -> None:
        with Session(self.engine) as session:
            account_ids = list(session.exec(select(RequesterAccount.id).order_by(RequesterAccount.id)).all())
        for account_id in account_ids:
            self.check(account_id)

    # ---- helpers --------------------------------------------------------------------------
    def _lock_known(self, session: Session, account_ids: set[str]) -> dict[str, RequesterAccount]:
        """Lock the accounts that exist (in id order); unknown ones are left out for the caller to refuse."""
        known = set(session.exec(select(RequesterAccount.id).where(
            col(RequesterAccount.id).in_(list(account_ids)))).all()) if account_ids else set()
        return _lock_accounts(session, known)

    def _by_id(self, transfer_id: str,
               transition: Callable[[Session, RequesterAccount, Transfer, datetime], Transfer]) -> TransferRecord:
        _check_id(transfer_id)

        def work(session: Session) -> TransferRecord:
            account_id = _stored_accounts(session, [transfer_id]).get(transfer_id)
            if account_id is None:
                raise UnknownTransfer(transfer_id)
            account = _lock_accounts(session, {account_id})[account_id]
            row = session.get(Transfer, transfer_id)
            assert row is not None  # transfers are never deleted
            return TransferRecord.of(transition(session, account, row, utcnow()))

        return self._transaction(work)
