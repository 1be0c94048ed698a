"""The settler: drives payout batches through a persisted state machine until they are paid on-chain.

    planned ──sign──► signed ──send──► sent ──receipt──► confirmed ──depth──► paid
       ▲                 ▲               │ stuck: re-sign, same nonce, higher fees
       │                 └───────────────┘
       └─ nonce taken by another transaction             reverted ──► voided (amounts back to payable)
                                          confirmed ──receipt gone (reorg)──► sent

Each state is written to the database **before** the external action it allows: the signed raw
transaction and its hash are stored before they are sent, so a crash at any point is resumed by
`advance` without paying twice (the contract also refuses a settled batch id). Before sending, the
settler looks for a receipt of every attempt it stored, so a transaction that was sent just before a
crash is recognised. A stored transaction the node refuses as underpriced (signed before a crash,
fees risen since) is signed again with the same nonce. Nonces come from the database (the highest
used + 1) checked against the chain's pending nonce. A batch counts as paid only `confirmations`
blocks deep.

`SettlerConfig.pause_after` is a test hook (`GATEWAY_SETTLE_PAUSE_AFTER`, read by `gateway settle`
only): once a batch's new state is committed, the settler says so on stderr and blocks until it is
killed, so a test can SIGKILL a real process at that exact state boundary (tests/test_settler_crash.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from ledger.chain.errors import ChainError, TransactionReverted
from ledger.chain.settlement_chain import NonceConsumed, SettlementChain
from ledger.models import PayoutAttempt, PayoutBatch
from ledger.settlement.payouts import (CONFIRMED, PAID, PLANNED, SENT, SIGNED, UNFINISHED, VOIDED, PayoutPolicy,
                                       batch_lines, move, plan_batches)
from storage.database import utcnow
from storage.locks import exclusive

MIN_REPLACEMENT_BUMP_PERCENT = 10  # nodes refuse a same-nonce replacement with a smaller fee increase
FEE_TOO_LOW = ("less than block base fee", "transaction underpriced", "fee too low", "feetoolow")
"""How nodes refuse a transaction whose fees are below what they accept now (anvil, geth, Nethermind).
Not "replacement transaction underpriced": that one names another transaction holding the nonce."""


@dataclass(frozen=True)
class SettlerConfig:
    """How the settler treats the chain."""

    confirmations: int = 2
    stuck_after_seconds: float = 30.0
    fee_bump_percent: int = 25
    gas_margin_percent: int = 20
    poll_seconds: float = 0.5
    pause_after: str | None = None  # test hook: block once a batch's state becomes this one (see the module doc)

    def __post_init__(self) -> None:
        if self.confirmations < 1:
            raise ValueError("confirmations must be >= 1")
        if self.pause_after is not None and self.pause_after not in UNFINISHED:
            raise ValueError(f"pause_after must be one of {', '.join(UNFINISHED)}")
        if self.fee_bump_percent < MIN_REPLACEMENT_BUMP_PERCENT:
            raise ValueError(f"fee_bump_percent must be >= {MIN_REPLACEMENT_BUMP_PERCENT} (nodes refuse less)")


@dataclass(frozen=True)
class BatchView:
    """What `gateway settle --json` prints for a batch."""

    id: str
    state: str
    tx_hash: str | None
    payees: int
    total: int
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "state": self.state, "tx_hash": self.tx_hash, "payees": self.payees,
                "total": str(self.total), **({"reason": self.reason} if self.reason else {})}


class Settler:
    """Plans payout batches and advances unfinished ones; safe to kill and restart at any point."""

    def __init__(self, engine: Engine, chain: SettlementChain, policy: PayoutPolicy,
                 config: SettlerConfig | None = None, report: Callable[[str], None] = lambda _line: None) -> None:
        self.engine = engine
        self.chain = chain
        self.policy = policy
        self.config = config or SettlerConfig()
        self.report = report

    # ---- rounds --------------------------------------------------------------------------
    def plan(self) -> list[PayoutBatch]:
        batches = plan_batches(self.engine, self.policy, chain_id=self.chain.chain_id,
                               settler=self.chain.settler_address, operator=self.chain.operator)
        for batch in batches:
            self.report(f"[settle] planned batch {batch.id[:10]}…: {batch.payee_count} payees, {batch.total} base units")
        if batches and self.config.pause_after == PLANNED:
            pause_forever(PLANNED, batches[0].id)
        return batches

    def unfinished(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.exec(select(PayoutBatch.id).where(col(PayoutBatch.state).in_(UNFINISHED))
                                     .order_by(col(PayoutBatch.created_at), col(PayoutBatch.id))).all())

    def run_round(self, timeout_seconds: float = 600.0) -> list[BatchView]:
        """Resume unfinished batches, plan new ones, and advance them all until paid or voided.

        One round at a time per database (a cross-process lock): two settlers never drive the same batch.
        """
        with exclusive(self.engine, "settler"):
            return self._round(timeout_seconds)

    def _round(self, timeout_seconds: float) -> list[BatchView]:
        ids = sorted(set(self.unfinished()) | {batch.id for batch in self.plan()})
        deadline = time.monotonic() + timeout_seconds
        while open_ids := [batch_id for batch_id in self.unfinished() if batch_id in ids]:
            if time.monotonic() > deadline:
                self.report(f"[settle] {len(open_ids)} batches still unfinished after {timeout_seconds:.0f} s; "
                            "they are resumed by the next round")
                break
            for batch_id in open_ids:
                self.advance(batch_id)
            if set(self.unfinished()) & set(open_ids):
                time.sleep(self.config.poll_seconds)
        return self.views(ids)

    def views(self, ids: list[str]) -> list[BatchView]:
        with Session(self.engine) as session:
            rows = session.exec(select(PayoutBatch).where(col(PayoutBatch.id).in_(ids))
                                .order_by(col(PayoutBatch.created_at), col(PayoutBatch.id))).all()
            return [BatchView(b.id, b.state, b.tx_hash, b.payee_count, b.total, b.reason) for b in rows]

    # ---- one step ------------------------------------------------------------------------
    def advance(self, batch_id: str) -> str:
        """Take one step for the batch; its state afterwards."""
        with Session(self.engine) as session:
            batch = session.get(PayoutBatch, batch_id)
            if batch is None:
                raise KeyError(batch_id)
            before = batch.state
            step = {PLANNED: self._sign, SIGNED: self._send, SENT: self._watch, CONFIRMED: self._deepen}.get(batch.state)
            if step is not None:
                step(session, batch)
            state = batch.state
        if state != before and state == self.config.pause_after:  # committed by the step, session closed
            pause_forever(state, batch_id)
        return state

    def _sign(self, session: Session, batch: PayoutBatch, nonce: int | None = None,
              fees: tuple[int, int] | None = None) -> None:
        lines = batch_lines(session, batch.id)
        if nonce is None and self._adopt_settlement_found_onchain(session, batch):
            return
        nonce = self._next_nonce(session) if nonce is None else nonce
        max_fee, priority = fees or self.chain.fees()
        try:
            estimate = self.chain.estimate_gas(batch.id, batch.manifest_hash, lines)
        except TransactionReverted as error:
            if batch.nonce is None:  # never sent: nothing of it can be mined, so its amounts go back
                self._void(session, batch, f"the settler contract would refuse it: {error}")
                return
            if self._found_receipt(session, batch) or self.chain.is_settled(batch.id):
                return  # an earlier attempt was mined while we re-signed: watching confirms it
            raise
        gas = estimate * (100 + self.config.gas_margin_percent) // 100
        raw, tx_hash = self.chain.sign(batch.id, batch.manifest_hash, lines, nonce=nonce, gas=gas, max_fee=max_fee,
                                       priority_fee=priority)
        session.add(PayoutAttempt(tx_hash=tx_hash, batch_id=batch.id, nonce=nonce, gas=gas, max_fee_per_gas=max_fee,
                                  max_priority_fee_per_gas=priority, raw=raw))
        self._set(session, batch, SIGNED, nonce=nonce, tx_hash=tx_hash)
        self.report(f"[settle] batch {batch.id[:10]}… signed: nonce {nonce}, tx {tx_hash}")

    def _send(self, session: Session, batch: PayoutBatch) -> None:
        if self._found_receipt(session, batch):
            return
        attempt = session.get(PayoutAttempt, batch.tx_hash)
        assert attempt is not None, f"batch {batch.id} is signed without an attempt"
        try:
            self.chain.send(attempt.raw)
        except NonceConsumed:
            if self._found_receipt(session, batch):
                return
            self.report(f"[settle] batch {batch.id[:10]}…: nonce {batch.nonce} was used by another transaction; "
                        "signing again with a new nonce")
            self._set(session, batch, PLANNED, nonce=None, tx_hash=None)
            return
        except ChainError as error:
            reason = str(error).lower()
            if "replacement" in reason or not any(text in reason for text in FEE_TOO_LOW):
                raise
            # Signed long ago (e.g. before a crash) and fees have risen since: the node would refuse it on
            # every round. Re-sign with the same nonce, so at most one of the batch's attempts can be mined.
            self.report(f"[settle] batch {batch.id[:10]}…: the node refuses {attempt.tx_hash} as underpriced; "
                        f"re-signing nonce {batch.nonce} with current fees")
            self._sign(session, batch, nonce=batch.nonce, fees=self._raised_fees(attempt))
            return
        attempt.sent_at = utcnow()
        session.add(attempt)
        self._set(session, batch, SENT)
        self.report(f"[settle] batch {batch.id[:10]}… sent: {attempt.tx_hash}")

    def _watch(self, session: Session, batch: PayoutBatch) -> None:
        if self._found_receipt(session, batch):
            return
        latest = session.get(PayoutAttempt, batch.tx_hash)
        assert latest is not None and latest.sent_at is not None
        if self.chain.mined_nonce() > (batch.nonce or 0):
            # Our nonce was consumed: by one of our attempts (mined since the check above), or by another transaction.
            if not self._found_receipt(session, batch):
                self._set(session, batch, PLANNED, nonce=None, tx_hash=None)
            return
        waited = (datetime.now(UTC) - latest.sent_at).total_seconds()
        if waited < self.config.stuck_after_seconds:
            return
        self.report(f"[settle] batch {batch.id[:10]}… stuck for {waited:.0f} s: re-signing nonce {batch.nonce} "
                    f"with fees +{self.config.fee_bump_percent}%")
        self._sign(session, batch, nonce=batch.nonce, fees=self._raised_fees(latest))

    def _raised_fees(self, latest: PayoutAttempt) -> tuple[int, int]:
        """Fees for a same-nonce replacement: `latest`'s raised by fee_bump_percent, and at least today's."""
        bump = 100 + self.config.fee_bump_percent
        current_fee, current_priority = self.chain.fees()
        return (max(latest.max_fee_per_gas * bump // 100 + 1, current_fee),
                max(latest.max_priority_fee_per_gas * bump // 100 + 1, current_priority))

    def _deepen(self, session: Session, batch: PayoutBatch) -> None:
        receipt = self.chain.receipt(batch.tx_hash or "")
        if receipt is None or receipt.block_hash != batch.block_hash:
            self.report(f"[settle] batch {batch.id[:10]}…: its block left the chain (reorg); waiting for it again")
            self._set(session, batch, SENT, block_number=None, block_hash=None, gas_used=None)
            return
        depth = self.chain.block_number() - receipt.block_number + 1
        if depth < self.config.confirmations:
            self.chain.mine_if_local(self.config.confirmations - depth)
            return
        move(session, "payout_paid", batch.id, batch_lines(session, batch.id), source="pending", target="paid")
        self._set(session, batch, PAID)
        self.report(f"[settle] batch {batch.id[:10]}… paid: {batch.payee_count} payees, {batch.total} base units, "
                    f"tx {batch.tx_hash} ({depth} confirmations)")

    def _adopt_settlement_found_onchain(self, session: Session, batch: PayoutBatch) -> bool:
        """A batch the contract already settled (e.g. the database was restored from a backup): adopt its tx."""
        if not self.chain.is_settled(batch.id):
            return False
        tx_hash = self.chain.settlement_tx(batch.id)
        receipt = self.chain.receipt(tx_hash) if tx_hash else None
        if receipt is None:
            raise ChainError(f"batch {batch.id} is settled on-chain but its transaction cannot be found")
        self._set(session, batch, CONFIRMED, tx_hash=tx_hash, block_number=receipt.block_number,
                  block_hash=receipt.block_hash, gas_used=receipt.gas_used)
        self.report(f"[settle] batch {batch.id[:10]}… was already settled on-chain by {tx_hash}")
        return True

    def _found_receipt(self, session: Session, batch: PayoutBatch) -> bool:
        """Whether any attempt of the batch was mined; moves it to confirmed or voided if so."""
        attempts = session.exec(select(PayoutAttempt.tx_hash).where(PayoutAttempt.batch_id == batch.id)).all()
        for tx_hash in attempts:
            receipt = self.chain.receipt(tx_hash)
            if receipt is None:
                continue
            if receipt.status == 1:
                self._set(session, batch, CONFIRMED, tx_hash=tx_hash, block_number=receipt.block_number,
                          block_hash=receipt.block_hash, gas_used=receipt.gas_used)
                self.report(f"[settle] batch {batch.id[:10]}… mined in block {receipt.block_number}")
            else:
                self._void(session, batch, f"transaction {tx_hash} reverted", tx_hash=tx_hash)
            return True
        return False

    def _void(self, session: Session, batch: PayoutBatch, reason: str, **fields: object) -> None:
        move(session, "payout_voided", batch.id, batch_lines(session, batch.id), source="pending", target="payable")
        self._set(session, batch, VOIDED, reason=reason, **fields)
        self.report(f"[settle] batch {batch.id[:10]}… voided: {reason}; its amounts are payable again")

    def _next_nonce(self, session: Session) -> int:
        """The highest nonce this operator used on this chain + 1, or the chain's pending nonce if higher."""
        used = session.exec(select(func.max(PayoutAttempt.nonce)).join(
            PayoutBatch, col(PayoutBatch.id) == col(PayoutAttempt.batch_id)).where(
            PayoutBatch.operator == self.chain.operator, PayoutBatch.chain_id == self.chain.chain_id,
            col(PayoutBatch.state) != PLANNED)).one()
        from_db = 0 if used is None else used + 1
        return max(from_db, self.chain.chain_nonce())

    @staticmethod
    def _set(session: Session, batch: PayoutBatch, state: str, **fields: object) -> None:
        """Persist the new state (and fields) now: callers act on the chain only after this commit."""
        for name, value in fields.items():
            setattr(batch, name, value)
        batch.state = state
        batch.updated_at = utcnow()
        session.add(batch)
        session.commit()
        session.refresh(batch)


def pause_forever(state: str, batch_id: str) -> NoReturn:
    """The `pause_after` test hook: announce the boundary on stderr, then block until the process is killed."""
    print(f"[settle] paused after {state} (batch {batch_id})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
