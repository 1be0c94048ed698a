"""Payout batches in the journal: plan them from payable balances, and move their amounts as they settle.

Every move is a balanced journal entry whose ref is the batch id, so it happens at most once:
    planned  payable:<a> −x, pending:<a> +x      (kind "payout_planned")
    paid     pending:<a> −x, paid:<a> +x         (kind "payout_paid")
    voided   pending:<a> −x, payable:<a> +x      (kind "payout_voided": paid later, in another batch)
A payee's `payable + pending + paid` therefore never changes when batches are planned, paid or voided.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from eth_utils import keccak
from sqlalchemy import Engine, insert
from sqlmodel import Session, col, select

from ledger.models import JournalEntry, PayoutBatch, PayoutLine, Posting
from storage.amounts import exact_sum
from storage.database import utcnow
from storage.locks import exclusive

MAX_PAYEES_PER_BATCH = 400
PLANNED, SIGNED, SENT, CONFIRMED, PAID, VOIDED = "planned", "signed", "sent", "confirmed", "paid", "voided"
UNFINISHED = (PLANNED, SIGNED, SENT, CONFIRMED)


@dataclass(frozen=True)
class PayoutPolicy:
    """Who is paid in a round: payable balances >= `threshold`, at most `max_payees` per transaction."""

    threshold: int
    max_payees: int = MAX_PAYEES_PER_BATCH

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError("the payout threshold must be >= 1 base unit")
        if not 1 <= self.max_payees <= MAX_PAYEES_PER_BATCH:
            raise ValueError(f"max_payees must be in 1..{MAX_PAYEES_PER_BATCH}")


@dataclass(frozen=True)
class PlannedLine:
    address: str
    amount: int


def manifest(batch_id: str, chain_id: int, settler: str, lines: list[PlannedLine]) -> bytes:
    """The canonical JSON a batch's manifest hash commits to (lines sorted by address)."""
    body = {"batch_id": batch_id, "chain_id": chain_id, "settler": settler,
            "lines": [[line.address, str(line.amount)] for line in sorted(lines, key=lambda x: x.address)]}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def payable_balances(session: Session, threshold: int) -> list[PlannedLine]:
    """Addresses whose payable balance is at least `threshold`, largest first."""
    rows = session.exec(select(Posting.account, exact_sum(Posting.amount))
                        .where(col(Posting.account).startswith("payable:")).group_by(Posting.account)).all()
    lines = [PlannedLine(account.removeprefix("payable:"), int(amount)) for account, amount in rows
             if int(amount) >= threshold]
    return sorted(lines, key=lambda line: (-line.amount, line.address))


def plan_batches(engine: Engine, policy: PayoutPolicy, *, chain_id: int, settler: str,
                 operator: str) -> list[PayoutBatch]:
    """Move every payable balance >= threshold into new planned batches (one transaction); the batches."""
    with exclusive(engine, "payouts"), Session(engine) as session:
        lines = payable_balances(session, policy.threshold)
        batches = []
        for start in range(0, len(lines), policy.max_payees):
            chunk = lines[start:start + policy.max_payees]
            batch_id = "0x" + secrets.token_hex(32)
            batch = PayoutBatch(
                id=batch_id, state=PLANNED, payee_count=len(chunk), total=sum(line.amount for line in chunk),
                manifest_hash="0x" + keccak(manifest(batch_id, chain_id, settler, chunk)).hex(),
                chain_id=chain_id, settler=settler, operator=operator,
            )
            session.add(batch)
            session.flush()
            session.execute(insert(PayoutLine.__table__),  # type: ignore[attr-defined]
                            [{"batch_id": batch_id, "address": line.address, "amount": line.amount} for line in chunk])
            move(session, "payout_planned", batch_id, chunk, source="payable", target="pending")
            batches.append(batch)
        session.commit()
        for batch in batches:
            session.refresh(batch)
            session.expunge(batch)
        return batches


def batch_lines(session: Session, batch_id: str) -> list[PlannedLine]:
    rows = session.exec(select(PayoutLine).where(PayoutLine.batch_id == batch_id).order_by(col(PayoutLine.address)))
    return [PlannedLine(row.address, row.amount) for row in rows]


def move(session: Session, kind: str, batch_id: str, lines: list[PlannedLine], *, source: str, target: str) -> None:
    """One balanced entry moving each line's amount from `source:<a>` to `target:<a>` (in the session)."""
    entry_id = session.execute(insert(JournalEntry).returning(JournalEntry.id),  # type: ignore[arg-type]
                               [{"kind": kind, "ref": batch_id, "created_at": utcnow()}]).scalar_one()
    postings = []
    for line in lines:
        postings.append({"entry_id": entry_id, "account": f"{source}:{line.address}", "role": "payee",
                         "amount": -line.amount})
        postings.append({"entry_id": entry_id, "account": f"{target}:{line.address}", "role": "payee",
                         "amount": line.amount})
    session.execute(insert(Posting.__table__), postings)  # type: ignore[attr-defined]
