"""The rows an accepted trace becomes, and the statements that write a batch of them.

One `write_traces` call writes a whole ingest batch with three batched statements (SQLAlchemy Core,
executemany; the entries as multi-row INSERT … RETURNING): the journal entries (their ids returned
in order), every entry's postings, and the trace rows. The ledger's
ingest uses it after its checks; `loadtests/bench_ledger.py` uses it alone for the raw insert rate,
so both write the same rows the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert
from sqlmodel import Session

from ledger.journal.fee_split import Share
from ledger.models import IngestedTrace, JournalEntry, Posting

INFERENCE = "inference"  # the entry kind of a trace (ref = trace id)


@dataclass(frozen=True, slots=True)
class TraceRow:
    """An `IngestedTrace` row without its entry id, and the shares its entry posts."""

    trace_id: str
    content_sha256: str
    model: str
    adapter: str | None
    requester: str | None
    prompt_tokens: int
    completion_tokens: int
    attributed_tokens: float
    price_per_1k_tokens: int
    fee: int
    body: str
    shares: Sequence[Share]


def write_traces(session: Session, rows: Sequence[TraceRow], now: datetime, kind: str = INFERENCE) -> list[int]:
    """Insert one entry per row (ref = trace id), its postings and the trace row; the entry ids, in order."""
    if not rows:
        return []
    entry_ids = list(session.execute(
        insert(JournalEntry).returning(JournalEntry.id, sort_by_parameter_order=True),  # type: ignore[arg-type]
        [{"kind": kind, "ref": row.trace_id, "created_at": now} for row in rows],
    ).scalars())
    postings = [{"entry_id": entry_id, "account": share.account, "role": share.role, "amount": share.amount}
                for entry_id, row in zip(entry_ids, rows, strict=True) for share in row.shares]
    if postings:  # Core inserts of the tables: no ORM bookkeeping per row
        session.execute(insert(Posting.__table__), postings)  # type: ignore[attr-defined]
    session.execute(insert(IngestedTrace.__table__), [  # type: ignore[attr-defined]
        {"trace_id": row.trace_id, "content_sha256": row.content_sha256, "model": row.model, "adapter": row.adapter,
         "requester": row.requester, "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
         "attributed_tokens": row.attributed_tokens, "price_per_1k_tokens": row.price_per_1k_tokens, "fee": row.fee,
         "body": row.body, "entry_id": entry_id, "received_at": now}
        for entry_id, row in zip(entry_ids, rows, strict=True)])
    return entry_ids
