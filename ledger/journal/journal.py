"""The double-entry journal: attribution traces in, one balanced entry per trace, balances out.

Guarantees (checked in code and in tests, on SQLite and PostgreSQL):
- ingest is idempotent on trace id: a repeat with the same content (SHA-256 of the canonical JSON)
  is answered `duplicate` with the original entry and posts nothing; the same id with different
  content is answered `conflict`, recorded in `TraceConflict`, and the stored trace is kept; a
  `recovered` trace (rebuilt by the gateway from its usage record) whose id is stored is a
  `duplicate` whatever its content;
- each accepted trace gets exactly one `JournalEntry(kind="inference", ref=trace id)` whose postings
  sum to zero (ledger/journal/fee_split.py), written in the same transaction as the trace;
- balances are sums of postings, computed exactly (storage/amounts.py).

A batch is checked with two reads (stored ids; contribution owners, cached) and written with three
batched statements (ledger/journal/rows.py). Traces arrive prepared (ledger/journal/prepared.py:
canonical JSON, hash and exact weights in one pass over the wire form) or as `AttributionTrace`s.

An adapter's terms (price, owner, lineage) are read from the registry tables. An adapter that is
not registered, and the base model, have price 0: the trace is stored with an empty entry.
"""

from __future__ import annotations

import logging

import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Engine, func, insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ledger.accounts.accounts import REQUESTER_PREFIX, requester_account
from ledger.accounts.transfers import PostOrder, Transfers
from ledger.client.trace import AttributionTrace
from ledger.client.fees import fee_for
from ledger.journal.fee_split import REVENUE_ACCOUNT, FeeSplitPolicy, Share, split_fee_scaled
from ledger.journal.prepared import PreparedTrace, prepare
from ledger.journal.rows import INFERENCE, TraceRow, write_traces
from ledger.models import ApiKey, IngestedTrace, JournalEntry, PayoutBatch, Posting, TraceConflict
from registry.adapters import lineage_contents, parse_price
from registry.contribution_content import checksum_address
from registry.models import Adapter, Contribution
from storage.amounts import exact_sum
from storage.database import utcnow

ADDRESS_ACCOUNT_CLASSES = ("payable", "pending", "paid")
UNREGISTERED_RETRY_SECONDS = 5.0
OWNERS_CACHED = 200_000  # contribution owners kept in memory (about 50 MB at most)

Status = Literal["accepted", "duplicate", "conflict", "rejected"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    trace_id: str
    status: Status
    entry_id: int = 0
    reason: str = ""


@dataclass(frozen=True)
class AdapterTerms:
    """What the ledger charges for an adapter and who its lineage credits."""

    price_per_1k_tokens: int
    owner: str | None
    lineage_counts: dict[str, int] = field(default_factory=dict)  # contributor → distinct lineage contributions

    @classmethod
    def unpriced(cls) -> AdapterTerms:
        return cls(0, None)


@dataclass(frozen=True)
class AddressBalance:
    address: str
    payable: int
    pending: int
    paid: int


@dataclass(frozen=True)
class StatementLine:
    entry_id: int
    kind: str
    ref: str
    account: str
    role: str
    amount: int
    created_at: str
    tx_hash: str | None = None  # payout lines: the transaction that paid the batch
    traces: tuple[str, ...] = ()  # payout lines: the traces whose credits the payout pays


@dataclass(frozen=True)
class EntryRecord:
    id: int
    kind: str
    ref: str
    created_at: str
    postings: list[Share]


@dataclass(frozen=True)
class TraceRecord:
    trace: AttributionTrace
    content_sha256: str
    fee: int
    price_per_1k_tokens: int
    received_at: str
    entry: EntryRecord


@dataclass(frozen=True)
class Totals:
    traces: int
    entries: int
    postings: int
    conflicts: int
    completion_tokens: int
    attributed_tokens: int
    fees: int
    by_class: dict[str, int]
    postings_sum: int
    unbalanced_entries: int


class Journal:
    """Ingest and look-ups over the ledger's database; safe to share between threads."""

    def __init__(self, engine: Engine, policy: FeeSplitPolicy | None = None) -> None:
        self.engine = engine
        self.transfers = Transfers(engine)
        self.policy = policy or FeeSplitPolicy()
        self._terms: dict[str, tuple[float, AdapterTerms]] = {}
        self._terms_lock = threading.Lock()
        self._owners: dict[str, str] = {}
        self._owners_lock = threading.Lock()

    # ---- ingest ------------------------------------------------------------------------
    def ingest(self, traces: Sequence[AttributionTrace]) -> list[IngestResult]:
        """Post a batch of traces in one transaction; one result per trace, in order."""
        return self.ingest_prepared([prepare(trace) for trace in traces])

    def ingest_prepared(self, batch: Sequence[PreparedTrace]) -> list[IngestResult]:
        """`ingest` of traces already prepared (ledger/journal/prepared.py: the wire path)."""
        try:
            return self._ingest(batch)
        except IntegrityError:
            # Another stream stored one of these ids between our look-up and our insert: the second
            # pass sees it and answers duplicate/conflict.
            return self._ingest(batch)

    def _ingest(self, batch: Sequence[PreparedTrace]) -> list[IngestResult]:
        results: dict[int, IngestResult] = {}
        with Session(self.engine) as session:
            ids = list({p.trace_id for p in batch})
            stored = {row[0]: (row[1], row[2]) for row in session.exec(
                select(IngestedTrace.trace_id, IngestedTrace.content_sha256, IngestedTrace.entry_id)
                .where(col(IngestedTrace.trace_id).in_(ids))).all()}
            owners = self._contribution_owners(session, batch)
            payers = self._payers(session, batch)
            new: list[tuple[int, PreparedTrace, AdapterTerms, list[Share], int]] = []
            claimed: dict[str, str] = {}
            conflicts = []
            for position, item in enumerate(batch):
                trace_id = item.trace_id
                known = stored.get(trace_id)
                earlier = claimed.get(trace_id)
                if known is not None or earlier is not None:
                    sha = known[0] if known is not None else earlier
                    if sha == item.sha or item.recovered:  # a recovered copy never bills twice
                        results[position] = IngestResult(trace_id, "duplicate", known[1] if known else 0)
                    else:
                        conflicts.append({"trace_id": trace_id, "content_sha256": item.sha, "body": item.body,
                                          "received_at": utcnow()})
                        results[position] = IngestResult(trace_id, "conflict", known[1] if known else 0,
                                                         f"trace {trace_id} was ingested before with other content "
                                                         f"(stored sha256 {sha}); the stored trace is kept")
                    continue
                unknown = sorted(item.weights.keys() - owners.keys())
                if unknown:
                    results[position] = IngestResult(trace_id, "rejected", 0,
                                                     f"unknown contribution id(s): {', '.join(unknown[:3])}")
                    continue
                if item.requester is not None and item.requester not in payers:
                    results[position] = IngestResult(trace_id, "rejected", 0,
                                                     f"unknown requester key {item.requester!r}")
                    continue
                terms = self.terms(session, item.adapter)
                fee = fee_for(terms.price_per_1k_tokens, item.prompt_tokens + item.completion_tokens)
                payer = payers.get(item.requester)  # type: ignore[arg-type]
                shares = self._shares(item, fee, terms, owners,
                                      requester_account(payer) if payer else REVENUE_ACCOUNT)
                claimed[trace_id] = item.sha
                new.append((position, item, terms, shares, fee))
            if conflicts:
                self._record_conflicts(session, conflicts)
            if new:
                self._write(session, new, results)
            session.commit()
        # A duplicate of a trace first seen in this same batch gets that trace's entry id.
        entry_of = {r.trace_id: r.entry_id for r in results.values() if r.status == "accepted"}
        return [
            IngestResult(r.trace_id, r.status, r.entry_id or entry_of.get(r.trace_id, 0), r.reason)
            for r in (results[i] for i in range(len(batch)))
        ]

    @staticmethod
    def _record_conflicts(session: Session, conflicts: list[dict[str, object]]) -> None:
        """Keep each refused version once (a resend of the same refused trace is not a new conflict)."""
        known = set(session.exec(select(TraceConflict.trace_id, TraceConflict.content_sha256).where(
            col(TraceConflict.trace_id).in_({c["trace_id"] for c in conflicts}))).all())
        fresh: dict[tuple[object, object], dict[str, object]] = {}
        for conflict in conflicts:
            key = (conflict["trace_id"], conflict["content_sha256"])
            if key not in known:
                fresh.setdefault(key, conflict)
        if fresh:
            session.execute(insert(TraceConflict), list(fresh.values()))

    def _write(self, session: Session, new: list[tuple[int, PreparedTrace, AdapterTerms, list[Share], int]],
               results: dict[int, IngestResult]) -> None:
        now = utcnow()
        rows = [TraceRow(trace_id=item.trace_id, content_sha256=item.sha, model=item.model, adapter=item.adapter,
                         requester=item.requester, prompt_tokens=item.prompt_tokens,
                         completion_tokens=item.completion_tokens, attributed_tokens=item.attributed_tokens,
                         price_per_1k_tokens=terms.price_per_1k_tokens, fee=fee, body=item.body, shares=shares)
                for _, item, terms, shares, fee in new]
        entry_ids = write_traces(session, rows, now)
        orders = []  # each requester-paid trace posts its request's hold (ledger/accounts/transfers.py)
        for entry_id, (position, item, _, shares, _) in zip(entry_ids, new, strict=True):
            results[position] = IngestResult(item.trace_id, "accepted", entry_id)
            for share in shares:
                if share.role == "payer" and share.account.startswith(REQUESTER_PREFIX):
                    orders.append(PostOrder(item.trace_id, -share.amount, share.account[len(REQUESTER_PREFIX):]))
        if not orders:
            return
        for order, outcome in zip(orders, self.transfers.post_many(orders, session=session), strict=True):
            if isinstance(outcome, Exception):  # a trace id the ledger knows as a lease, or a voided hold
                log.error("trace %s: its hold could not be posted (%s); the fee is charged all the same",
                          order.id, outcome)
                self.transfers.charge(session, order.account_id, order.charge)  # type: ignore[arg-type]

    def _shares(self, item: PreparedTrace, fee: int, terms: AdapterTerms,
                owners: dict[str, str], payer: str) -> list[Share]:
        attributed: dict[str, int] = {}  # address → its contributions' summed weight, exact (2**-1074 units)
        for contribution_id, units in item.weights.items():
            address = owners[contribution_id]
            attributed[address] = attributed.get(address, 0) + units
        return split_fee_scaled(self.policy, fee, owner=terms.owner, attributed=attributed,
                                unattributed=item.unattributed, lineage_counts=terms.lineage_counts, payer=payer)

    @staticmethod
    def _payers(session: Session, batch: Sequence[PreparedTrace]) -> dict[str, str]:
        """Requester key id → the account it belongs to, for the keys these traces name (revoked ones too:
        a request admitted before the revocation is still billed)."""
        keys = sorted({p.requester for p in batch if p.requester is not None})
        if not keys:
            return {}
        return dict(session.exec(select(ApiKey.id, ApiKey.account_id).where(col(ApiKey.id).in_(keys))).all())

    def _contribution_owners(self, session: Session, batch: Sequence[PreparedTrace]) -> dict[str, str]:
        """Contribution id → contributor, for the ids these traces name (unknown ids are left out). Cached:
        a contribution's id is its content's hash and its contributor never changes."""
        wanted = {cid for p in batch for cid in p.weights}
        with self._owners_lock:
            owners = {cid: self._owners[cid] for cid in wanted if cid in self._owners}
        missing = sorted(wanted - owners.keys())
        found: dict[str, str] = {}
        for start in range(0, len(missing), 500):
            chunk = missing[start:start + 500]
            found.update(session.exec(select(Contribution.id, Contribution.contributor)
                                      .where(col(Contribution.id).in_(chunk))).all())
        if found:
            with self._owners_lock:
                if len(self._owners) + len(found) > OWNERS_CACHED:
                    self._owners.clear()
                self._owners.update(found)
        return owners | found

    def terms(self, session: Session, adapter: str | None) -> AdapterTerms:
        """An adapter's price, owner and lineage; cached (registered terms never change)."""
        if adapter is None:
            return AdapterTerms.unpriced()
        with self._terms_lock:
            cached = self._terms.get(adapter)
        if cached is not None and (cached[1].owner is not None or time.monotonic() < cached[0]):
            return cached[1]
        row = session.get(Adapter, adapter)
        if row is None:
            found = AdapterTerms.unpriced()
        else:
            contributors = lineage_contents(session, adapter).contributions.values()
            found = AdapterTerms(parse_price(row.price_per_1k_tokens), checksum_address(row.owner),
                                 dict(Counter(checksum_address(address) for address, _ in contributors)))
        with self._terms_lock:
            self._terms[adapter] = (time.monotonic() + UNREGISTERED_RETRY_SECONDS, found)
        return found

    # ---- look-ups ----------------------------------------------------------------------
    def balance(self, address: str) -> AddressBalance:
        """payable / pending / paid of an address (ValueError when it is not an address)."""
        address = checksum_address(address)
        accounts = {f"{kind}:{address}": kind for kind in ADDRESS_ACCOUNT_CLASSES}
        with Session(self.engine) as session:
            rows = session.exec(select(Posting.account, exact_sum(Posting.amount))
                                .where(col(Posting.account).in_(accounts)).group_by(Posting.account)).all()
        sums = {accounts[account]: int(total) for account, total in rows}
        return AddressBalance(address, *(sums.get(kind, 0) for kind in ADDRESS_ACCOUNT_CLASSES))

    def account_balance(self, account: str) -> int:
        with Session(self.engine) as session:
            return int(session.exec(select(exact_sum(Posting.amount)).where(Posting.account == account)).one())

    def statement(self, address: str, *, limit: int = 100, before_entry_id: int = 0) -> list[StatementLine]:
        """Postings on the address's accounts, newest entry first."""
        address = checksum_address(address)
        accounts = [f"{kind}:{address}" for kind in ADDRESS_ACCOUNT_CLASSES]
        query = (select(Posting, JournalEntry).join(JournalEntry, col(JournalEntry.id) == col(Posting.entry_id))
                 .where(col(Posting.account).in_(accounts)))
        if before_entry_id:
            query = query.where(col(Posting.entry_id) < before_entry_id)
        query = query.order_by(col(Posting.entry_id).desc(), col(Posting.id)).limit(limit)
        with Session(self.engine) as session:
            rows = session.exec(query).all()
            batches = {entry.ref for _, entry in rows if entry.kind.startswith("payout_")}
            payouts = {batch: self._payout_details(session, address, batch) for batch in batches}
        return [StatementLine(entry.id, entry.kind, entry.ref, posting.account, posting.role, posting.amount,
                              entry.created_at.isoformat(), *payouts.get(entry.ref, (None, ())))
                for posting, entry in rows]

    @staticmethod
    def _payout_details(session: Session, address: str, batch_id: str) -> tuple[str | None, tuple[str, ...]]:
        """The batch's transaction, and the traces that credited the address since its previous payout.

        A payout sweeps the address's whole payable balance, so it pays the inference credits posted
        after the previous (not voided) payout was planned and before this one was.
        """
        batch = session.get(PayoutBatch, batch_id)
        plans = session.exec(
            select(JournalEntry.id, JournalEntry.ref).join(Posting, col(Posting.entry_id) == col(JournalEntry.id))
            .join(PayoutBatch, col(PayoutBatch.id) == col(JournalEntry.ref))
            .where(JournalEntry.kind == "payout_planned", Posting.account == f"pending:{address}",
                   col(PayoutBatch.state) != "voided")
            .order_by(col(JournalEntry.id))).all()
        ids = [entry_id for entry_id, _ in plans]
        this = next((entry_id for entry_id, ref in plans if ref == batch_id), None)
        if this is None:
            return (batch.tx_hash if batch else None), ()
        previous = max((entry_id for entry_id in ids if entry_id < this), default=0)
        traces = session.exec(
            select(JournalEntry.ref).join(Posting, col(Posting.entry_id) == col(JournalEntry.id))
            .where(JournalEntry.kind == INFERENCE, Posting.account == f"payable:{address}",
                   col(JournalEntry.id) > previous, col(JournalEntry.id) < this)
            .distinct().order_by(JournalEntry.ref)).all()
        mined = batch is not None and batch.state in ("confirmed", "paid")
        return (batch.tx_hash if mined else None), tuple(traces)

    def trace(self, trace_id: str) -> TraceRecord | None:
        with Session(self.engine) as session:
            row = session.get(IngestedTrace, trace_id)
            if row is None:
                return None
            entry = session.get(JournalEntry, row.entry_id)
            postings = session.exec(select(Posting).where(Posting.entry_id == row.entry_id)
                                    .order_by(col(Posting.id))).all()
        assert entry is not None and entry.id is not None
        return TraceRecord(
            trace=AttributionTrace.from_dict(json.loads(row.body)), content_sha256=row.content_sha256, fee=row.fee,
            price_per_1k_tokens=row.price_per_1k_tokens, received_at=row.received_at.isoformat(),
            entry=EntryRecord(entry.id, entry.kind, entry.ref, entry.created_at.isoformat(),
                              [Share(p.account, p.role, p.amount) for p in postings]),  # type: ignore[arg-type]
        )

    def sums_by_class(self) -> dict[str, int]:
        """Balance of each account class (`payable`, `pending`, `paid`, `treasury`, …), base units."""
        with Session(self.engine) as session:
            return _sums_by_class(session)

    def totals(self) -> Totals:
        """Counts and sums over the whole journal, with the two invariants re-checked in SQL."""
        with Session(self.engine) as session:
            traces, completion, attributed, fees = session.exec(select(
                func.count(), func.coalesce(func.sum(IngestedTrace.completion_tokens), 0),
                func.coalesce(func.sum(IngestedTrace.attributed_tokens), 0.0), exact_sum(IngestedTrace.fee),
            )).one()
            entries = session.exec(select(func.count()).select_from(JournalEntry)).one()
            conflicts = session.exec(select(func.count()).select_from(TraceConflict)).one()
            postings = session.exec(select(func.count()).select_from(Posting)).one()
            by_class = _sums_by_class(session)
            unbalanced = session.exec(select(func.count()).select_from(
                select(Posting.entry_id).group_by(Posting.entry_id)
                .having(exact_sum(Posting.amount) != 0).subquery())).one()
        return Totals(traces=traces, entries=entries, postings=postings, conflicts=conflicts,
                      completion_tokens=int(completion), attributed_tokens=int(attributed + 1e-6), fees=int(fees),
                      by_class=by_class, postings_sum=sum(by_class.values()), unbalanced_entries=unbalanced)


def _sums_by_class(session: Session) -> dict[str, int]:
    """Sum of postings per account class: the part of the account name before ':'."""
    by_class: dict[str, int] = {}
    for account, amount in session.exec(select(Posting.account, exact_sum(Posting.amount)).group_by(Posting.account)):
        kind = account.split(":", 1)[0]
        by_class[kind] = by_class.get(kind, 0) + int(amount)
    return by_class
