"""The settler against a real anvil and a real database (SQLite and PostgreSQL): rounds pay exactly once,
crashes at every state boundary resume, a reorg sends a batch back, a stuck transaction is re-signed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import Session, select

from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode
from ledger.chain.client import ChainClient
from ledger.chain.errors import ChainUnavailable
from ledger.chain.settlement import PayoutToken, ensure_settlement
from ledger.chain.settlement_chain import SettlementChain
from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.journal.journal import Journal
from ledger.models import PayoutAttempt, PayoutBatch
from ledger.settlement.payouts import PAID, SENT, SIGNED, VOIDED, PayoutPolicy
from ledger.settlement.settler import Settler, SettlerConfig
from tests.conftest import free_port
from tests.ledger.conftest import CIDS, OWNER
from tests.registry.test_datanet_registry import ALICE, BOB

PAYEES = (ALICE.address, BOB.address, OWNER.address)


class Crash(Exception):
    """Stands for the settler process dying at this point."""


class CrashingChain:
    """The real SettlementChain, but `send` can die just before or just after the node gets the transaction."""

    def __init__(self, chain: SettlementChain, crash: str | None) -> None:
        self._chain = chain
        self.crash = crash

    def __getattr__(self, name: str) -> object:
        return getattr(self._chain, name)

    def send(self, raw: str) -> None:
        if self.crash == "before send":
            raise Crash
        self._chain.send(raw)
        if self.crash == "after send":
            raise Crash


class LaggingNode:
    """The real SettlementChain seen through a node that is behind: the first `hidden` receipt reads (and, while
    `stale_nonce`, the mined nonce) do not show the block that already holds the transaction."""

    def __init__(self, chain: SettlementChain, hidden: int, stale_nonce: bool) -> None:
        self._chain = chain
        self.hidden = hidden
        self.stale_nonce = stale_nonce

    def __getattr__(self, name: str) -> object:
        return getattr(self._chain, name)

    def receipt(self, tx_hash: str) -> object:
        if self.hidden > 0:
            self.hidden -= 1
            return None
        return self._chain.receipt(tx_hash)

    def mined_nonce(self) -> int:
        return 0 if self.stale_nonce else self._chain.mined_nonce()


@pytest.fixture()
def chain(anvil_node: AnvilNode, tmp_path: Path) -> SettlementChain:
    """A fresh token and a funded settler on the session's anvil (automine on)."""
    client = ChainClient(anvil_node.rpc_url, ANVIL_DEV_KEYS[0])
    _token, settler = ensure_settlement(client, tmp_path / "deployment.json", fund=10**30)
    rpc(client, "evm_setAutomine", True)
    return SettlementChain(client, settler, local=True)


def rpc(client: ChainClient, method: str, *params: object) -> object:
    reply = client.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
    assert "error" not in reply, reply
    return reply.get("result")


def earn(journal: Journal, trace_id: str) -> None:
    """One priced inference: Alice, Bob and the adapter owner become payable."""
    tokens = (TokenAttribution(5, ((CIDS[0], 0.5), (CIDS[2], 0.5)), 0.0),) * 8
    trace = AttributionTrace(trace_id, "river-guide", "river-guide", None, 100, len(tokens), tokens, "m")
    assert journal.ingest([trace])[0].status == "accepted"


def settler(journal: Journal, chain: object, **config: object) -> Settler:
    return Settler(journal.engine, chain, PayoutPolicy(threshold=1), SettlerConfig(**config))  # type: ignore[arg-type]


def assert_paid_exactly_once(journal: Journal, chain: SettlementChain) -> None:
    token = PayoutToken(chain.client, chain.settler.token_address)
    for address in PAYEES:
        balance = journal.balance(address)
        assert balance.pending == 0
        assert token.balance_of(address) == balance.paid > 0, address
    with Session(journal.engine) as session:
        batches = session.exec(select(PayoutBatch)).all()
    assert all(batch.state in (PAID, VOIDED) for batch in batches)
    events = chain.settler.settlement_events()
    assert len(events) == len({e["batch_id"] for e in events}) == sum(b.state == PAID for b in batches)
    totals = journal.totals()
    assert totals.postings_sum == 0 and totals.unbalanced_entries == 0


def step_until(journal: Journal, make: Callable[[], Settler], batch_id: str, state: str, limit: int = 20) -> None:
    """Advance one step at a time, each by a fresh Settler (a restarted process), until `state`."""
    for _ in range(limit):
        if make().advance(batch_id) == state:
            return
    raise AssertionError(f"batch never reached {state}")


def test_a_round_pays_every_payable_balance_once(journal: Journal, chain: SettlementChain) -> None:
    earn(journal, "t-1")
    owed = {address: journal.balance(address).payable for address in PAYEES}
    views = settler(journal, chain).run_round(timeout_seconds=60)
    assert [v.state for v in views] == [PAID] and views[0].payees == 3 and views[0].total == sum(owed.values())
    assert_paid_exactly_once(journal, chain)
    assert {a: journal.balance(a).paid for a in PAYEES} == owed and all(journal.balance(a).payable == 0 for a in PAYEES)
    assert settler(journal, chain).run_round(timeout_seconds=60) == [], "nothing is paid twice"
    earn(journal, "t-2")
    earn(journal, "t-3")
    [second] = settler(journal, chain).run_round(timeout_seconds=60)
    assert second.state == PAID
    assert_paid_exactly_once(journal, chain)
    # A contributor sees, for each payout, the batch, its transaction and the traces it pays.
    statement = journal.statement(ALICE.address)
    assert {line.kind for line in statement} == {"inference", "payout_planned", "payout_paid"}
    payouts = {(line.ref, line.tx_hash, line.traces) for line in statement if line.kind == "payout_paid"}
    assert payouts == {(views[0].id, views[0].tx_hash, ("t-1",)), (second.id, second.tx_hash, ("t-2", "t-3"))}


@pytest.mark.parametrize("crash", ["before send", "after send", "between steps"])
def test_a_settler_killed_at_any_boundary_resumes_without_paying_twice(journal: Journal, chain: SettlementChain,
                                                                       crash: str) -> None:
    earn(journal, "t-1")
    [batch] = settler(journal, chain).plan()
    crashing = CrashingChain(chain, None if crash == "between steps" else crash)
    step_until(journal, lambda: settler(journal, crashing), batch.id, SIGNED)
    if crash != "between steps":
        with pytest.raises(Crash):
            settler(journal, crashing).advance(batch.id)
        with Session(journal.engine) as session:
            assert session.get(PayoutBatch, batch.id).state == SIGNED, "the state written before the send stays"
    step_until(journal, lambda: settler(journal, chain), batch.id, PAID)
    assert_paid_exactly_once(journal, chain)


def test_a_reorg_that_drops_the_payout_block_sends_the_batch_back(journal: Journal, chain: SettlementChain) -> None:
    earn(journal, "t-1")
    [batch] = settler(journal, chain).plan()
    make = lambda: settler(journal, chain, confirmations=3, stuck_after_seconds=0.001)  # noqa: E731
    step_until(journal, make, batch.id, "confirmed")
    with Session(journal.engine) as session:
        mined = session.get(PayoutBatch, batch.id).block_number
    rpc(chain.client, "anvil_reorg", chain.block_number() - mined + 1, [])  # replace the block holding it
    assert chain.receipt(batch.tx_hash or "") is None or chain.receipt(batch.tx_hash or "").block_number != mined
    assert make().advance(batch.id) == SENT, "the receipt left with its block"
    step_until(journal, make, batch.id, PAID, limit=40)
    assert_paid_exactly_once(journal, chain)


@pytest.mark.parametrize("stale_nonce", [False, True], ids=["receipt-late", "receipt-and-nonce-late"])
def test_a_transaction_mined_while_judged_stuck_is_confirmed_not_replaced(journal: Journal, chain: SettlementChain,
                                                                           stale_nonce: bool) -> None:
    """The node shows the mined block only after the settler has started to treat the transaction as stuck."""
    earn(journal, "t-1")
    [batch] = settler(journal, chain).plan()
    step_until(journal, lambda: settler(journal, chain, stuck_after_seconds=3600), batch.id, SENT)
    lagging = LaggingNode(chain, hidden=1, stale_nonce=stale_nonce)
    assert settler(journal, lagging, stuck_after_seconds=0.0).advance(batch.id) == "confirmed"
    with Session(journal.engine) as session:
        attempts = session.exec(select(PayoutAttempt).where(PayoutAttempt.batch_id == batch.id)).all()
    assert len(attempts) == 1, "nothing was re-signed for a mined transaction"
    step_until(journal, lambda: settler(journal, chain), batch.id, PAID)
    assert_paid_exactly_once(journal, chain)


def test_a_stuck_transaction_is_re_signed_with_the_same_nonce_and_higher_fees(journal: Journal,
                                                                              chain: SettlementChain) -> None:
    earn(journal, "t-1")
    [batch] = settler(journal, chain).plan()
    make = lambda: settler(journal, chain, stuck_after_seconds=0.001)  # noqa: E731
    rpc(chain.client, "evm_setAutomine", False)
    try:
        step_until(journal, make, batch.id, SENT)
        assert make().advance(batch.id) == SIGNED, "stuck: signed again"
        with Session(journal.engine) as session:
            attempts = session.exec(select(PayoutAttempt).where(PayoutAttempt.batch_id == batch.id)
                                    .order_by(PayoutAttempt.created_at)).all()
        assert len(attempts) == 2 and attempts[0].nonce == attempts[1].nonce
        assert attempts[1].max_fee_per_gas >= attempts[0].max_fee_per_gas * 125 // 100
        assert make().advance(batch.id) == SENT
    finally:
        rpc(chain.client, "evm_setAutomine", True)
    rpc(chain.client, "evm_mine")
    step_until(journal, make, batch.id, PAID)
    with Session(journal.engine) as session:
        assert session.get(PayoutBatch, batch.id).tx_hash == attempts[1].tx_hash, "the replacement was mined"
    assert_paid_exactly_once(journal, chain)


def test_an_underfunded_settler_voids_the_batch_and_the_amounts_stay_payable(journal: Journal, anvil_node: AnvilNode,
                                                                              tmp_path: Path) -> None:
    client = ChainClient(anvil_node.rpc_url, ANVIL_DEV_KEYS[0])
    _token, contract = ensure_settlement(client, tmp_path / "empty.json", fund=0)
    earn(journal, "t-1")
    owed = journal.balance(ALICE.address).payable
    [view] = settler(journal, SettlementChain(client, contract, local=True)).run_round(timeout_seconds=30)
    assert view.state == VOIDED and "InsufficientTreasury" in view.reason
    assert journal.balance(ALICE.address).payable == owed and journal.balance(ALICE.address).pending == 0


def test_an_unreachable_chain_changes_nothing(journal: Journal, chain: SettlementChain) -> None:
    earn(journal, "t-1")
    dead = SettlementChain(ChainClient(f"http://127.0.0.1:{free_port()}", ANVIL_DEV_KEYS[0]), chain.settler)
    with pytest.raises(ChainUnavailable):
        settler(journal, dead).run_round(timeout_seconds=5)
    with Session(journal.engine) as session:
        assert session.exec(select(PayoutBatch)).all() == []
    assert journal.balance(ALICE.address).pending == 0
