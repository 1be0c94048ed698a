"""Every call of the ledger's API needs its token, on loopback too.

A real `gateway ledger serve` process (the one `gateway up` runs) on loopback: its token is generated
once into an owner-only file; a call without it, or with another one, is refused UNAUTHENTICATED and
stores nothing; only the standard health check answers without it; the CLI and the shipper read the
token from the state directory or GATEWAY_LEDGER_TOKEN.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import func
from sqlmodel import Session, select

from attribution.outbox import Outbox
from attribution.shipper import TraceShipper
from gateway.cli import main
from gateway.ledger_process import LedgerProcess
from ledger.client.token import TOKEN_ENV, LedgerTokenMissing, read_ledger_token
from ledger.client.trace_wire import trace_to_pb
from ledger.journal.journal import Journal
from ledger.models import IngestedTrace, JournalEntry, Posting, TraceConflict
from statedir.layout import StateLayout
from tests.support.ports import NO_CHAIN, free_port
from tests.ledger.test_service import make_trace
from tests.registry.test_datanet_registry import ALICE
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

WRONG = [
    None,                                                  # no metadata at all
    (("authorization", "Bearer wrong-token-0123456789"),),  # another token
    (("authorization", "Bearer "),),                      # an empty one
]


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture()
def ledger(journal: Journal, database_url: str, tmp_path: Path) -> Iterator[LedgerProcess]:
    """`gateway ledger serve` on the journal's database, with a fresh state directory."""
    process = LedgerProcess(tmp_path / "state", "127.0.0.1", free_port(), env={"DATABASE_URL": database_url, **NO_CHAIN},
                            log_file=tmp_path / "ledger.log").start()
    yield process
    assert process.stop() == 0


def stored(journal: Journal) -> dict[str, int]:
    """Rows of every table an ingest writes."""
    with Session(journal.engine) as session:
        return {table.__name__: session.exec(select(func.count()).select_from(table)).one()
                for table in (IngestedTrace, JournalEntry, Posting, TraceConflict)}


def test_the_token_is_generated_once_into_an_owner_only_file_and_never_logged(ledger: LedgerProcess,
                                                                              tmp_path: Path) -> None:
    path = StateLayout(ledger.state_dir).ledger_token
    token = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "owner-only"
    assert len(token) >= 40 and ledger.token == token == read_ledger_token(ledger.state_dir)
    assert ledger.stop() == 0
    ledger.start()
    assert path.read_text().strip() == token, "a restart keeps the token its clients hold"
    log = (tmp_path / "ledger.log").read_text()
    assert str(path) in log and token not in log, "the log names the file, never the token"


def test_calls_without_the_token_are_refused_and_store_nothing(ledger: LedgerProcess, journal: Journal) -> None:
    before = stored(journal)
    trace = trace_to_pb(make_trace("unpaid"))
    with grpc.insecure_channel(ledger.target) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        calls = [
            lambda m: list(stub.Ingest(iter([ledger_pb2.IngestRequest(traces=[trace])]), timeout=10, metadata=m)),
            lambda m: stub.GetBalance(ledger_pb2.GetBalanceRequest(address=ALICE.address), timeout=10, metadata=m),
            lambda m: stub.GetBalance(ledger_pb2.GetBalanceRequest(account="treasury"), timeout=10, metadata=m),
            lambda m: stub.GetStatement(ledger_pb2.GetStatementRequest(address=ALICE.address), timeout=10,
                                        metadata=m),
            lambda m: stub.GetTrace(ledger_pb2.GetTraceRequest(trace_id="unpaid"), timeout=10, metadata=m),
            lambda m: stub.GetTotals(ledger_pb2.GetTotalsRequest(), timeout=10, metadata=m),
            lambda m: list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=m)),
        ]
        for metadata in WRONG:
            for index, call in enumerate(calls):
                with pytest.raises(grpc.RpcError) as refused:
                    call(metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (index, metadata)
        assert stored(journal) == before, "a refused ingest writes nothing"
        assert journal.trace("unpaid") is None
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="gateway.ledger.v1.Ledger"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "health is the one open call"
        # The same trace with the token is valid and stored: the refusals above were for the token alone.
        [ack] = list(stub.Ingest(iter([ledger_pb2.IngestRequest(traces=[trace])]), timeout=10,
                                 metadata=ledger.metadata))
        assert ack.status == ledger_pb2.IngestAck.STATUS_ACCEPTED
        assert stub.GetTotals(ledger_pb2.GetTotalsRequest(), timeout=10, metadata=ledger.metadata).traces == 1
    assert stored(journal)["IngestedTrace"] == before["IngestedTrace"] + 1


def test_the_environment_token_wins_and_no_file_is_written(journal: Journal, database_url: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    token = "operator-chosen-token-0123456789"
    process = LedgerProcess(tmp_path / "state", "127.0.0.1", free_port(),
                            env={"DATABASE_URL": database_url, TOKEN_ENV: token, **NO_CHAIN}).start()
    try:
        assert not StateLayout(tmp_path / "state").ledger_token.exists()
        with grpc.insecure_channel(process.target) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            assert stub.GetTotals(ledger_pb2.GetTotalsRequest(), timeout=10,
                                  metadata=(("authorization", f"Bearer {token}"),)).traces == 0
        monkeypatch.setenv(TOKEN_ENV, "short")
        code = main(["--state-dir", str(tmp_path / "state"), "ledger", "totals"])
        assert code == 2, "an unusable token is refused before any call"
    finally:
        assert process.stop() == 0


def test_the_cli_reads_the_token_of_the_state_directory_or_the_environment(
        ledger: LedgerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(ledger.port))

    def cli(state: Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--state-dir", str(state), "ledger", "totals", "--json"])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli(ledger.state_dir)
    assert code == 0 and json.loads(out)["traces"] == 0
    code, out, err = cli(tmp_path / "elsewhere")
    assert (code, out) == (2, "") and err.startswith("gateway: no ledger token") and TOKEN_ENV in err
    monkeypatch.setenv(TOKEN_ENV, ledger.token)
    assert cli(tmp_path / "elsewhere")[0] == 0, "GATEWAY_LEDGER_TOKEN is the token of a ledger elsewhere"
    monkeypatch.setenv(TOKEN_ENV, "wrong-token-0123456789")
    code, out, err = cli(ledger.state_dir)
    assert (code, out) == (2, "") and "refused the token" in err and len(err.strip().splitlines()) == 1


def test_a_shipper_without_the_token_keeps_its_traces_until_it_has_it(ledger: LedgerProcess, journal: Journal,
                                                                     tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    for i in range(3):
        outbox.put(make_trace(f"t{i}"))
    before = stored(journal)
    state = tmp_path / "gateway-state"  # a gateway whose ledger runs elsewhere, before it has the token
    with pytest.raises(LedgerTokenMissing):
        read_ledger_token(state)
    shipper = TraceShipper(outbox, ledger.target, token=lambda: read_ledger_token(state), backoff_initial=0.05,
                           backoff_max=0.2)
    shipper.start()
    try:
        time.sleep(1.5)
        assert outbox.depth() == 3 and stored(journal) == before, "no token: nothing is sent, nothing is lost"
        assert shipper.stats()["send_failures"] >= 1
        state.mkdir()
        StateLayout(state).ledger_token.write_text("wrong-token-0123456789\n")
        time.sleep(1.5)
        assert outbox.depth() == 3 and stored(journal) == before, "a wrong token: refused, nothing stored"
        StateLayout(state).ledger_token.write_text(ledger.token + "\n")  # the operator copies the ledger's token
        assert shipper.wait_until_empty(30), f"{outbox.depth()} traces left"
    finally:
        shipper.stop()
    assert stored(journal)["IngestedTrace"] == before["IngestedTrace"] + 3
