"""Settlement metrics read the ledger's database: batches by state, amounts by state, gas of paid batches."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from sqlmodel import Session

from ledger.journal.journal import Journal
from ledger.metrics import BATCH_STATES, TOKEN_BASE_UNITS, SettlementCollector
from ledger.models import PayoutBatch
from ledger.settlement.payouts import PAID, SENT
from tests.ledger.conftest import CIDS
from tests.ledger.test_journal import token, trace


def batch(batch_id: int, state: str, gas_used: int | None) -> PayoutBatch:
    return PayoutBatch(id=f"0x{batch_id:064x}", state=state, manifest_hash="0x" + "00" * 32, payee_count=1, total=1,
                       chain_id=31337, settler="0x" + "11" * 20, operator="0x" + "22" * 20, gas_used=gas_used)


def test_settlement_metrics_follow_the_database(journal: Journal) -> None:
    registry = CollectorRegistry()
    registry.register(SettlementCollector(journal, cache_seconds=0))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert [value("ledger_payout_batches", state=state) for state in BATCH_STATES] == [0] * len(BATCH_STATES)
    assert (value("ledger_payout_amount_tokens", state="payable"), value("ledger_settlement_gas_used_total")) == (0, 0)

    journal.ingest([trace("t-1", [token({CIDS[0]: 1.0})] * 4)])
    payable = journal.sums_by_class()["payable"]
    assert payable > 0
    assert value("ledger_payout_amount_tokens", state="payable") == payable / TOKEN_BASE_UNITS
    assert value("ledger_payout_amount_tokens", state="paid") == 0

    with Session(journal.engine) as session:
        session.add_all([batch(1, PAID, 51_000), batch(2, PAID, 70_000), batch(3, SENT, None)])
        session.commit()
    assert value("ledger_payout_batches", state=PAID) == 2
    assert value("ledger_payout_batches", state=SENT) == 1
    assert value("ledger_settlement_gas_used_total") == 121_000, "only paid batches' gas counts"


def test_scrapes_within_the_cache_window_reuse_one_reading(journal: Journal) -> None:
    collector = SettlementCollector(journal, cache_seconds=3600)
    first = list(collector.collect())
    with Session(journal.engine) as session:
        session.add(batch(9, PAID, 1))
        session.commit()
    assert list(collector.collect()) == first
