"""The replica's credit book over the ledger's AccessDesk on a real SQLite ledger, with a fake clock:
background renewal (running low, or half way through a lease's life at the ledger) and the return of
an idle lease. (Admission, exhaustion and a ledger restart over gRPC: tests/serving/test_access_over_grpc.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from ledger.accounts.access_desk import AccessDesk
from ledger.accounts.accounts import Accounts
from ledger.accounts.transfers import LEASE, PENDING, POSTED, Transfers
from serving.credit_book import CreditBook
from storage.database import open_database
from tests.support.clock import ManualClock


@pytest.fixture()
def book(tmp_path: Path) -> Iterator[tuple[CreditBook, Transfers, ManualClock]]:
    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    Accounts(engine).create("acme")
    Accounts(engine).credit("acme", 10_000, "c1")
    clock = ManualClock(1000.0)
    yield (CreditBook(AccessDesk(engine), "replica-a", lease_requests=10, idle_return_seconds=30,
                      lease_ttl_seconds=300, clock=clock, background=False), Transfers(engine), clock)
    engine.dispose()


def leases(transfers: Transfers) -> list[tuple[str, int]]:
    return [(t.state, t.amount) for t in transfers.list("acme") if t.kind == LEASE]


def test_a_lease_in_use_is_renewed_at_half_its_life_and_an_idle_one_is_returned(book) -> None:  # noqa: ANN001
    credit, transfers, clock = book
    credit.hold("r-1", "acme", 100)
    assert leases(transfers) == [(PENDING, 1000)]
    clock.now += 100
    credit.tend()
    assert leases(transfers) == [(PENDING, 1000)], "young, and 900 of 1000 left: kept"
    clock.now += 60  # 160 s old, used 60 s ago: in use, past half of 300 s
    credit.finish("r-1", 40, billed=True)
    credit.tend()
    assert [state for state, _ in leases(transfers)] == [POSTED, PENDING], "replaced before the ledger expires it"
    clock.now += 31  # idle past 30 s with nothing in flight
    credit.tend()
    assert [state for state, _ in leases(transfers)] == [POSTED, POSTED], "returned"
    transfers.check("acme")


def test_a_lease_running_low_is_renewed_in_the_background(book) -> None:  # noqa: ANN001
    credit, transfers, _ = book
    for i in range(8):  # 800 of 1000: below a quarter left
        credit.hold(f"r-{i}", "acme", 100)
    credit.tend()
    states = [state for state, _ in leases(transfers)]
    assert states == [POSTED, PENDING]
    credit.hold("r-8", "acme", 100)  # from the new lease, no call needed
    credit.flush()
    assert transfers.get("r-8").state == PENDING
    transfers.check("acme")


def test_a_hold_report_the_ledger_refuses_is_counted_and_exported(book) -> None:  # noqa: ANN001
    credit, transfers, _ = book
    transfers.hold("r-taken", "acme", 5)  # the same id, another amount: the report conflicts
    exported = REGISTRY.get_sample_value("gateway_hold_reports_refused_total")
    credit.hold("r-taken", "acme", 100)
    credit.hold("r-fine", "acme", 100)
    credit.flush()
    assert credit.refused_reports == 1
    assert REGISTRY.get_sample_value("gateway_hold_reports_refused_total") == exported + 1
    assert (transfers.get("r-taken").amount, transfers.get("r-fine").state) == (5, PENDING), "the refused one changed nothing"
    transfers.check("acme")
