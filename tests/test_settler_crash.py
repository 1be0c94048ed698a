"""A real ledger process killed with SIGKILL at each state boundary of a payout batch it settles, then run again.

`gateway settle` asks the ledger service (`gateway ledger serve`), which runs the round. The ledger's
test hook (`GATEWAY_SETTLE_PAUSE_AFTER`, docs/settlement.md) blocks the round right after a batch's
state is committed and says so in the ledger's log; the test kills the ledger's whole process group
there (the waiting `gateway settle` then says the ledger stopped answering), checks what the crash
left (database and chain), starts the ledger again without the hook, runs `gateway settle` again,
and checks the outcome on the chain, not only in the database: every payee's token balance equals
its `paid` balance in the ledger, each batch id has exactly one `BatchSettled` event, the operator
sent exactly one transaction per batch, and the journal still balances.

Three payees and at most two per batch make two batches, so a kill also lands while the other batch
is one step behind. Everything is real: anvil from node_modules on a free loopback port, the ledger
and the CLI as subprocesses, SQLite in the state directory (and PostgreSQL for one boundary).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from gateway.ledger_process import LedgerProcess
from ledger.accounts.accounts import Accounts
from ledger.accounts.api_keys import ApiKeys
from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode
from ledger.chain.client import ChainClient
from ledger.chain.settlement import PayoutSettler, PayoutToken, ensure_settlement
from ledger.journal.fee_split import FeeSplitPolicy
from ledger.journal.journal import Journal
from ledger.models import JournalEntry, PayoutAttempt, PayoutBatch
from ledger.settlement.payouts import CONFIRMED, PAID, PLANNED, SENT, SIGNED
from tests.conftest import free_port
from tests.ledger.conftest import OWNER, rivers_ledger
from tests.ledger.test_settler_anvil import earn, rpc
from tests.registry.test_datanet_registry import ALICE, BOB

GATEWAY = Path(sys.executable).with_name("gateway")  # .venv/bin/gateway beside the tests' interpreter
PAYEES = (ALICE.address, BOB.address, OWNER.address)
MAX_PAYEES = 2  # three payees: two batches
CONFIRMATIONS = 3  # a batch mined one block after the other is still short of this depth
MARKER_TIMEOUT_SECONDS = 60.0
RERUN_TIMEOUT_SECONDS = 90.0


@dataclass(frozen=True)
class Scenario:
    pause_after: str
    automine: bool = True
    fees_rise: bool = False  # while no settler runs, the base fee rises above the signed transaction's fee cap
    database: str = "sqlite"

    def __str__(self) -> str:
        return "-".join([self.pause_after, *([] if self.automine else ["automine-off"]),
                         *(["fees-rose"] if self.fees_rise else []), self.database])


SCENARIOS = [
    Scenario(PLANNED),
    Scenario(SIGNED),
    Scenario(SENT),
    Scenario(CONFIRMED),  # mined, CONFIRMATIONS not reached
    Scenario(SENT, automine=False),  # the transaction is in the node's pool, not in a block
    Scenario(SIGNED, fees_rise=True),  # the stored transaction is refused when resumed: it must be re-signed
    Scenario(CONFIRMED, database="postgresql"),  # the killed process's advisory lock must not outlive it
]


ONE_STEP_BEHIND = {PLANNED: PLANNED, SIGNED: PLANNED, SENT: SIGNED, CONFIRMED: SENT}


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilNode]:
    """One anvil for the module (automine); each scenario deploys its own token and settler on it."""
    node = AnvilNode(tmp_path_factory.mktemp("crash-anvil"), port=free_port())
    node.start()
    yield node
    assert node.stop() == 0, f"anvil did not exit cleanly; see {node.log_file}"


@dataclass
class Setup:
    scenario: Scenario
    state: Path
    engine: Engine
    journal: Journal
    client: ChainClient
    settler: PayoutSettler
    token: PayoutToken
    env: dict[str, str]  # of the ledger processes
    admin: str  # the admin key `gateway settle` presents


@pytest.fixture()
def setup(request: pytest.FixtureRequest, anvil: AnvilNode, tmp_path: Path) -> Iterator[Setup]:
    scenario: Scenario = request.param
    state = tmp_path / "state"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "DATABASE_URL"}
    if scenario.database == "postgresql":
        url = request.getfixturevalue("postgres").create_database(f"crash{os.getpid()}{time.monotonic_ns() % 10**9}")
        env["DATABASE_URL"] = url
    else:
        url = f"sqlite:///{state / 'ledger.db'}"  # the state directory's own ledger, as the CLI opens it
    engine = rivers_ledger(url, tmp_path)
    journal = Journal(engine, FeeSplitPolicy(contributors_bps=7000, owner_bps=2000))
    earn(journal, "t-1")
    Accounts(engine).create("ops")
    admin = ApiKeys(engine).create("ops", name="settler crash test", admin=True).presented
    # Deployed before the CLI runs (it finds them in the state directory), so automine can be off for its run.
    client = ChainClient(anvil.rpc_url, ANVIL_DEV_KEYS[0])
    token, settler = ensure_settlement(client, state / "chain" / "deployment.json", fund=10**30)
    # The ledger settles with these settings (and only when asked: no periodic round, no deposit watching).
    env |= {"GATEWAY_CHAIN_PORT": str(anvil.port), "GATEWAY_SETTLE_THRESHOLD": "1",
            "GATEWAY_SETTLE_MAX_PAYEES": str(MAX_PAYEES), "GATEWAY_SETTLE_CONFIRMATIONS": str(CONFIRMATIONS),
            "GATEWAY_SETTLE_PERIODIC": "false", "GATEWAY_DEPOSITS_WATCH": "false"}
    yield Setup(scenario, state, engine, journal, client, settler, token, env, admin)
    engine.dispose()


def start_ledger(setup: Setup, run: str, **env: str) -> LedgerProcess:
    """`gateway ledger serve` on the state directory (in a process group of its own), logging to `<state>/<run>.log`."""
    return LedgerProcess(setup.state, "127.0.0.1", free_port(), env=setup.env | env,
                         log_file=setup.state / f"{run}.log").start()


def settle(setup: Setup, run: str, ledger: LedgerProcess) -> subprocess.Popen[bytes]:
    """`gateway settle --json` asking `ledger`; stdout and stderr go to `<state>/<run>.out|err`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "DATABASE_URL"}
    env |= {"GATEWAY_LEDGER_PORT": str(ledger.port), "GATEWAY_ADMIN_KEY": setup.admin}
    with open(setup.state / f"{run}.out", "wb") as out, open(setup.state / f"{run}.err", "wb") as err:
        return subprocess.Popen([str(GATEWAY), "--state-dir", str(setup.state), "settle", "--json"],
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)


def output(setup: Setup, run: str) -> tuple[str, str]:
    """(stdout, stderr) of a `gateway settle` run so far."""
    out, err = ((setup.state / f"{run}.{kind}").read_text(errors="replace") for kind in ("out", "err"))
    return out, err


def kill_when_paused(setup: Setup, ledger: LedgerProcess, state: str) -> str:
    """Wait for the hook's marker in the ledger's log, SIGKILL its process group; the id of the batch it paused on."""
    marker = f"[settle] paused after {state} (batch "
    deadline = time.monotonic() + MARKER_TIMEOUT_SECONDS
    assert ledger.process is not None and ledger.log_file is not None
    try:
        while marker not in (log := ledger.log_file.read_text(errors="replace")):
            assert ledger.running(), f"the ledger exited ({ledger.process.returncode}) before pausing:\n{log}"
            assert time.monotonic() < deadline, f"no pause after {state} within {MARKER_TIMEOUT_SECONDS:g} s:\n{log}"
            time.sleep(0.05)
    finally:
        os.killpg(ledger.process.pid, signal.SIGKILL)
        ledger.process.wait(timeout=10)
    assert ledger.process.returncode == -signal.SIGKILL
    return log.split(marker, 1)[1].split(")", 1)[0]


def batches(engine: Engine) -> dict[str, PayoutBatch]:
    with Session(engine) as session:
        return {batch.id: batch for batch in session.exec(select(PayoutBatch)).all()}


def attempts(engine: Engine, batch_id: str) -> list[PayoutAttempt]:
    with Session(engine) as session:
        return list(session.exec(select(PayoutAttempt).where(PayoutAttempt.batch_id == batch_id)).all())


def events(setup: Setup) -> list[str]:
    return [event["batch_id"] for event in setup.settler.settlement_events()]


def transaction(setup: Setup, tx_hash: str) -> dict[str, object] | None:
    return rpc(setup.client, "eth_getTransactionByHash", tx_hash)  # type: ignore[return-value]


def check_what_the_crash_left(setup: Setup, scenario: Scenario, paused: str, owed: dict[str, int]) -> None:
    """The paused batch is in the state the hook named, and the chain agrees with what that state allows."""
    rows = batches(setup.engine)
    assert len(rows) == 2 and paused in rows
    batch = rows[paused]
    assert batch.state == scenario.pause_after, "the state committed before the pause survives the kill"
    [other] = [row.state for batch_id, row in rows.items() if batch_id != paused]
    assert other == ONE_STEP_BEHIND[scenario.pause_after], "a round takes one step per batch in turn"
    for address in PAYEES:  # nothing is paid in the ledger before the rerun: all of it is pending
        balance = setup.journal.balance(address)
        assert (balance.payable, balance.pending, balance.paid) == (0, owed[address], 0), address
    settled_on_chain = setup.settler.is_settled(bytes.fromhex(paused[2:]))
    if scenario.pause_after == PLANNED:
        assert all(row.state == PLANNED for row in rows.values()) and attempts(setup.engine, paused) == []
        assert not settled_on_chain
    elif scenario.pause_after == SIGNED:
        [attempt] = attempts(setup.engine, paused)
        assert attempt.sent_at is None and transaction(setup, attempt.tx_hash) is None, "signed, never sent"
        assert not settled_on_chain
    elif scenario.pause_after == SENT and not scenario.automine:
        pending = transaction(setup, batch.tx_hash or "")
        assert pending is not None and pending["blockNumber"] is None, "sent, waiting in the node's pool"
        assert rpc(setup.client, "eth_getTransactionReceipt", batch.tx_hash) is None
        assert not settled_on_chain
    elif scenario.pause_after == SENT:
        assert rpc(setup.client, "eth_getTransactionReceipt", batch.tx_hash) is not None, "automine mined it"
        assert settled_on_chain, "paid on-chain while the ledger still says pending"
    else:  # CONFIRMED: mined, not yet deep enough
        depth = setup.client.w3.eth.block_number - (batch.block_number or 0) + 1
        assert 1 <= depth < CONFIRMATIONS and settled_on_chain
    on_chain = {batch_id for batch_id, row in rows.items() if row.state in (SENT, CONFIRMED) and scenario.automine}
    assert sorted(events(setup)) == sorted(on_chain), "what automine mined before the kill, nothing else"


@pytest.mark.parametrize("setup", SCENARIOS, ids=str, indirect=True)
def test_a_ledger_killed_while_settling_at_a_state_boundary_resumes_and_pays_every_batch_once(setup: Setup) -> None:
    scenario = setup.scenario
    owed = {address: setup.journal.balance(address).payable for address in PAYEES}
    assert all(amount > 0 for amount in owed.values())
    nonce_before = setup.client.w3.eth.get_transaction_count(setup.client.address, "pending")
    stale_tx = ""

    if not scenario.automine:
        rpc(setup.client, "evm_setAutomine", False)
    rerun_ledger: LedgerProcess | None = None
    try:
        killed_ledger = start_ledger(setup, "killed-ledger", GATEWAY_SETTLE_PAUSE_AFTER=scenario.pause_after)
        killed = settle(setup, "killed", killed_ledger)
        paused = kill_when_paused(setup, killed_ledger, scenario.pause_after)
        assert killed.wait(timeout=30) == 1, "the waiting `gateway settle` exits when its ledger dies"
        assert "is not answering" in output(setup, "killed")[1]
        check_what_the_crash_left(setup, scenario, paused, owed)
        if not scenario.automine:
            rpc(setup.client, "evm_mine")  # the pending payout lands in a block while no settler runs
            assert rpc(setup.client, "eth_getTransactionReceipt", batches(setup.engine)[paused].tx_hash) is not None
        if scenario.fees_rise:
            [stale] = attempts(setup.engine, paused)
            stale_tx = stale.tx_hash
            rpc(setup.client, "anvil_setNextBlockBaseFeePerGas", hex(stale.max_fee_per_gas * 10))
            rpc(setup.client, "evm_mine")
            assert setup.client.w3.eth.get_block("latest")["baseFeePerGas"] > stale.max_fee_per_gas
        # Run again, automine still as it was: the settler mines the confirmation blocks on the local chain.
        rerun_ledger = start_ledger(setup, "rerun-ledger")
        rerun = settle(setup, "rerun", rerun_ledger)
        try:
            rerun.wait(timeout=RERUN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(rerun.pid, signal.SIGKILL)
            rerun.wait()
            pytest.fail(f"the rerun did not finish within {RERUN_TIMEOUT_SECONDS:g} s:\n{output(setup, 'rerun')[1]}")
    finally:
        rpc(setup.client, "evm_setAutomine", True)
        if rerun_ledger is not None:
            assert rerun_ledger.stop() == 0, f"the ledger did not stop cleanly; see {rerun_ledger.log_file}"
    out, err = output(setup, "rerun")
    assert rerun.returncode == 0, err
    assert rerun_ledger.log_file is not None and "paused" not in rerun_ledger.log_file.read_text(), \
        "the hook is off by default"
    rows = batches(setup.engine)
    assert {b["id"]: b["state"] for b in json.loads(out)["batches"]} == {batch_id: PAID for batch_id in rows}

    # On the chain: each payee holds exactly what the ledger says it was paid, which is all it was owed.
    for address in PAYEES:
        balance = setup.journal.balance(address)
        assert setup.token.balance_of(address) == balance.paid == owed[address], address
        assert balance.payable == balance.pending == 0, address
    # Each batch id settled exactly once on-chain, by one transaction each, and paid once in the journal.
    settled = setup.settler.settlement_events()
    assert sorted(e["batch_id"] for e in settled) == sorted(rows), "one BatchSettled event per batch, none twice"
    assert {e["batch_id"]: (e["total"], e["tx_hash"]) for e in settled} == {
        batch_id: (batch.total, batch.tx_hash) for batch_id, batch in rows.items()}
    assert setup.client.w3.eth.get_transaction_count(setup.client.address, "latest") - nonce_before == len(rows), \
        "the operator sent one transaction per batch: nothing was sent twice"
    with Session(setup.engine) as session:
        paid_entries = session.exec(select(JournalEntry.ref, func.count()).where(JournalEntry.kind == "payout_paid")
                                    .group_by(col(JournalEntry.ref))).all()
    assert dict(paid_entries) == {batch_id: 1 for batch_id in rows}
    if scenario.fees_rise:  # the stale transaction never reached the chain; its same-nonce replacement paid
        [stale, replacement] = sorted(attempts(setup.engine, paused), key=lambda a: a.tx_hash != stale_tx)
        assert stale.tx_hash == stale_tx and replacement.nonce == stale.nonce
        assert rows[paused].tx_hash == replacement.tx_hash and transaction(setup, stale_tx) is None
    totals = setup.journal.totals()
    assert totals.postings_sum == 0 and totals.unbalanced_entries == 0
    assert totals.by_class.get("pending", 0) == 0 and totals.by_class["paid"] == sum(owed.values())


def test_the_pause_hook_takes_only_a_state_a_batch_can_be_killed_in(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """The ledger checks the hook's setting before it starts, and starts nothing with a wrong one."""
    from gateway.cli import main

    monkeypatch.delenv("DATABASE_URL", raising=False)
    for value in ("paid", "voided", "sometime"):
        monkeypatch.setenv("GATEWAY_SETTLE_PAUSE_AFTER", value)
        assert main(["--state-dir", str(tmp_path), "ledger", "serve", "--port", str(free_port())]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("gateway: invalid setting pause_after:"), err
    assert list(tmp_path.iterdir()) == [], "nothing was started or created"
