"""The real path end to end, on SQLite and PostgreSQL: outbox → shipper → `gateway ledger serve` → journal,
with the ledger killed and restarted while traces are in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from attribution.outbox import Outbox
from attribution.shipper import TraceShipper
from gateway.ledger_process import LedgerProcess
from ledger.journal.journal import Journal
from tests.support.ports import NO_CHAIN, free_port
from tests.ledger.test_service import make_trace
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

TRACES = 300


def totals(ledger: LedgerProcess) -> ledger_pb2.Totals:
    with grpc.insecure_channel(ledger.target) as channel:
        return ledger_pb2_grpc.LedgerStub(channel).GetTotals(ledger_pb2.GetTotalsRequest(), timeout=30,
                                                             metadata=ledger.metadata)


def test_every_trace_arrives_once_across_a_ledger_crash(journal: Journal, database_url: str, tmp_path: Path) -> None:
    ledger = LedgerProcess(tmp_path, "127.0.0.1", free_port(), env={"DATABASE_URL": database_url, **NO_CHAIN},
                           log_file=tmp_path / "ledger.log").start()
    outbox = Outbox(tmp_path / "outbox")
    shipper = TraceShipper(outbox, ledger.target, token=ledger.token, batch_size=16, window=2, backoff_initial=0.05,
                           backoff_max=0.5)
    try:
        for i in range(TRACES // 2):
            outbox.put(make_trace(f"t{i:04d}", weight=(i % 10) / 10))
        shipper.start()
        deadline = time.monotonic() + 30
        while outbox.depth() > TRACES // 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        ledger.stop(kill=True)  # mid-stream: some batches were sent and not acknowledged
        for i in range(TRACES // 2, TRACES):
            outbox.put(make_trace(f"t{i:04d}", weight=(i % 10) / 10))
        assert outbox.depth() > 0
        ledger.start()
        assert shipper.wait_until_empty(60), f"outbox still holds {outbox.depth()} traces"
        stats = shipper.stats()
        assert stats["send_failures"] >= 1 and stats["conflicts"] == stats["rejected"] == 0
        assert stats["shipped"] + stats["duplicates"] == TRACES, stats  # duplicates: committed, ack lost
        result = totals(ledger)
        assert (result.traces, result.entries, result.conflicts) == (TRACES, TRACES, 0)
        assert result.postings_sum == "0" and result.unbalanced_entries == 0
        assert int(result.by_class["revenue"]) == -int(result.fees) < 0
    finally:
        shipper.stop()
        assert ledger.stop() == 0
    assert not outbox.rejected_dir.exists() or not any(outbox.rejected_dir.iterdir())
