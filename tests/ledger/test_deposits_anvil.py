"""The deposit watcher against a real anvil and a real database (SQLite and PostgreSQL): a transfer to the
treasury is credited once at the confirmation depth, never twice, never when a shallow reorg removed it;
a reorg deeper than the depth is reported and not reversed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlmodel import Session, select

from gateway.ledger_process import LedgerProcess
from ledger.accounts.accounts import Accounts
from ledger.accounts.deposits import DepositConfigError, DepositWatcher
from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode
from ledger.chain.client import ChainClient
from ledger.chain.settlement import (PayoutSettler, PayoutToken, block_number, ensure_settlement, send_raw,
                                     sign_transaction)
from ledger.client.admin import admin_client
from ledger.journal.fee_split import FeeSplitPolicy
from ledger.journal.journal import Journal
from ledger.models import Deposit, DepositScan
from storage.database import open_database
from tests.conftest import free_port

AMOUNT = 10**21  # base units: more than 64 bits


@dataclass
class Setup:
    engine: Engine
    client: ChainClient  # the operator (owns the token)
    token: PayoutToken
    treasury: str  # the settler contract: its token balance is the treasury
    alice: PayoutToken  # the token as seen by alice's deposit address (anvil dev key 1)
    stranger: PayoutToken  # an address no account claims (anvil dev key 2)
    start_block: int
    reports: list[str]

    def watcher(self, confirmations: int, **options: object) -> DepositWatcher:
        return DepositWatcher(self.engine, self.client, self.token.address, self.treasury, confirmations,
                              start_block=self.start_block, report=self.reports.append, **options)  # type: ignore[arg-type]

    def balance(self, account_id: str = "alice") -> int:
        return Accounts(self.engine).balance(account_id).balance

    def deposits(self) -> list[Deposit]:
        with Session(self.engine) as session:
            return list(session.exec(select(Deposit).order_by(Deposit.block_number, Deposit.id)).all())

    def mine(self, blocks: int = 1) -> None:
        rpc(self.client, "anvil_mine", hex(blocks))

    def head(self) -> int:
        return block_number(self.client)


def rpc(client: ChainClient, method: str, *params: object) -> object:
    reply = client.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
    assert "error" not in reply, reply
    return reply.get("result")


@pytest.fixture()
def setup(anvil_node: AnvilNode, anvil_client: ChainClient, database_url: str) -> Iterator[Setup]:
    """A fresh token and settler on the session's anvil (automine), alice's account with a deposit address."""
    rpc(anvil_client, "evm_setAutomine", True)
    token = PayoutToken.deploy(anvil_client)
    settler = PayoutSettler.deploy(anvil_client, token.address)
    alice = ChainClient(anvil_node.rpc_url, ANVIL_DEV_KEYS[1])
    stranger = ChainClient(anvil_node.rpc_url, ANVIL_DEV_KEYS[2])
    token.mint(alice.address, 100 * AMOUNT)
    token.mint(stranger.address, 100 * AMOUNT)
    token.mint(settler.address, AMOUNT)  # funding the treasury by a mint is not a deposit
    engine = open_database(database_url)
    Accounts(engine).create("alice", deposit_address=alice.address.lower())
    yield Setup(engine, anvil_client, token, settler.address, PayoutToken(alice, token.address),
                PayoutToken(stranger, token.address), block_number(anvil_client), [])
    engine.dispose()


def assert_invariants(setup: Setup) -> None:
    Accounts(setup.engine).check("alice")
    totals = Journal(setup.engine, FeeSplitPolicy()).totals()
    assert totals.postings_sum == 0 and totals.unbalanced_entries == 0
    credited = sum(d.amount for d in setup.deposits() if d.account_id == "alice" and d.entry_id is not None)
    assert setup.balance() == credited


def signed_transfer(token: PayoutToken, to: str, amount: int, nonce: int) -> bytes:
    """A transfer signed by `token`'s client, not sent (for a replacement chain or a re-mined transaction)."""
    client = token.client
    tx = token._contract.functions.transfer(to, amount).build_transaction({
        "from": client.address, "nonce": nonce, "chainId": client.chain_id, "gas": 100_000,
        "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9})
    return bytes(sign_transaction(client, tx).raw_transaction)


def test_a_deposit_is_credited_once_at_the_confirmation_depth_and_not_before(setup: Setup) -> None:
    watcher = setup.watcher(confirmations=3)
    assert watcher.scan_once() == [], "the mint that funded the treasury is not a deposit"
    setup.alice.transfer(setup.treasury, AMOUNT)
    mined = setup.head()
    for depth in (1, 2):
        assert setup.head() - mined + 1 == depth
        assert watcher.scan_once() == [] and setup.balance() == 0, f"credited at depth {depth}"
        setup.mine()
    [deposit] = watcher.scan_once()
    assert (deposit.account_id, deposit.amount, deposit.block_number) == ("alice", AMOUNT, mined)
    assert deposit.from_address == setup.alice.client.address and deposit.entry_id is not None
    assert deposit.id == f"{setup.client.chain_id}:{deposit.tx_hash}:0" and deposit.tx_hash.startswith("0x")
    assert setup.balance() == AMOUNT
    assert any("credited" in line and "alice" in line for line in setup.reports)
    for _ in range(3):
        setup.mine()
        assert watcher.scan_once() == []
    assert setup.balance() == AMOUNT
    with Session(setup.engine) as session:
        [cursor] = session.exec(select(DepositScan)).all()
    assert cursor.next_block == setup.head() - 3 + 2, "the cursor is past the deepest scanned block"
    assert_invariants(setup)


def test_rescans_a_restart_and_a_restored_cursor_credit_nothing_twice(setup: Setup) -> None:
    setup.alice.transfer(setup.treasury, AMOUNT)
    setup.alice.transfer(setup.treasury, 2 * AMOUNT)
    assert len(setup.watcher(confirmations=1).scan_once()) == 2
    assert setup.balance() == 3 * AMOUNT
    assert setup.watcher(confirmations=1).scan_once() == [], "a restarted watcher resumes at the cursor"
    with Session(setup.engine) as session:  # a database restored from before the scan's cursor update
        cursor = session.exec(select(DepositScan)).one()
        cursor.next_block = setup.start_block
        session.add(cursor)
        session.commit()
    assert setup.watcher(confirmations=1, max_blocks_per_scan=1).scan_once() == []
    assert setup.balance() == 3 * AMOUNT and len(setup.deposits()) == 2
    assert_invariants(setup)


def test_a_transfer_from_an_unknown_address_is_recorded_uncredited(setup: Setup) -> None:
    watcher = setup.watcher(confirmations=1)
    setup.stranger.transfer(setup.treasury, AMOUNT)
    setup.stranger.transfer(setup.treasury, 0)  # a zero-value transfer is not a deposit
    setup.stranger.transfer(setup.alice.client.address, AMOUNT)  # not to the treasury
    [deposit] = watcher.scan_once()
    assert deposit.account_id is None and deposit.entry_id is None and deposit.amount == AMOUNT
    assert deposit.from_address == setup.stranger.client.address
    assert any("no account has this deposit address" in line for line in setup.reports)
    assert len(setup.deposits()) == 1 and setup.balance() == 0
    assert_invariants(setup)


def test_a_deposit_removed_by_a_reorg_before_the_depth_is_never_credited(setup: Setup) -> None:
    watcher = setup.watcher(confirmations=3)
    nonce = setup.alice.client.w3.eth.get_transaction_count(setup.alice.client.address)
    setup.alice.transfer(setup.treasury, AMOUNT)
    removed = setup.head()
    setup.mine()
    assert watcher.scan_once() == [], "at depth 2 of 3"
    replacement = signed_transfer(setup.alice, setup.treasury, 5 * AMOUNT, nonce)  # same nonce: A is gone for good
    rpc(setup.client, "anvil_reorg", 2, [["0x" + replacement.hex(), 0]])
    assert setup.head() == removed + 1
    assert watcher.scan_once() == [] and setup.balance() == 0
    setup.mine()
    [deposit] = watcher.scan_once()
    assert deposit.amount == 5 * AMOUNT and deposit.block_number == removed and setup.balance() == 5 * AMOUNT
    setup.mine(3)
    assert watcher.scan_once() == [] and setup.balance() == 5 * AMOUNT
    assert not any("ERROR" in line for line in setup.reports), setup.reports
    assert_invariants(setup)


def test_a_reorg_deeper_than_the_depth_is_reported_and_not_reversed(setup: Setup,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    watcher = setup.watcher(confirmations=1)
    nonce = setup.alice.client.w3.eth.get_transaction_count(setup.alice.client.address)
    raw = signed_transfer(setup.alice, setup.treasury, AMOUNT, nonce)
    send_raw(setup.client, raw)  # automine: mined at once, alone in its block (log index 0)
    [credited] = watcher.scan_once()
    assert credited.entry_id is not None and setup.balance() == AMOUNT
    setup.mine(2)
    rpc(setup.client, "anvil_reorg", setup.head() - credited.block_number + 1, [])  # drop its block and later
    with caplog.at_level(logging.ERROR, logger="ledger.accounts.deposits"):
        assert watcher.scan_once() == []
    assert any(credited.id in record.getMessage() and "NOT reversed" in record.getMessage()
               for record in caplog.records), caplog.text
    assert setup.balance() == AMOUNT, "a credit is not reversed by the watcher"
    # The new chain mines the same transaction again, behind another transfer: a new log index, a new id.
    rpc(setup.client, "evm_setAutomine", False)
    try:
        stranger_nonce = setup.stranger.client.w3.eth.get_transaction_count(setup.stranger.client.address)
        send_raw(setup.client, signed_transfer(setup.stranger, setup.treasury, AMOUNT, stranger_nonce))
        send_raw(setup.client, raw)
        setup.mine()
    finally:
        rpc(setup.client, "evm_setAutomine", True)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ledger.accounts.deposits"):
        again = watcher.scan_once()
    mined_again = [d for d in again if d.tx_hash == credited.tx_hash]
    assert len(again) == 2 and len(mined_again) == 1 and mined_again[0].id != credited.id
    assert mined_again[0].entry_id is None, "one on-chain transfer never funds an account twice"
    assert any("credit withheld" in record.getMessage() for record in caplog.records), caplog.text
    assert setup.balance() == AMOUNT
    assert setup.watcher(confirmations=1).scan_once() == [], "a restarted watcher credits nothing"
    assert setup.balance() == AMOUNT
    assert_invariants(setup)


def test_a_cursor_beyond_the_safe_head_is_reported_and_rewound(setup: Setup,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    setup.alice.transfer(setup.treasury, AMOUNT)
    assert len(setup.watcher(confirmations=1).scan_once()) == 1
    deeper = setup.watcher(confirmations=4)  # confirmations raised between restarts
    with caplog.at_level(logging.ERROR, logger="ledger.accounts.deposits"):
        assert deeper.scan_once() == []
    assert any("rewinding to block" in record.getMessage() for record in caplog.records), caplog.text
    setup.mine(5)
    assert deeper.scan_once() == [] and setup.balance() == AMOUNT, "the rescanned deposit is not credited again"
    assert_invariants(setup)


def test_run_scans_until_stopped_and_survives_an_unreachable_chain(setup: Setup, anvil_node: AnvilNode,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    dead = ChainClient(f"http://127.0.0.1:{free_port()}", ANVIL_DEV_KEYS[0])
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="ledger.accounts.deposits"):
        failing = threading.Thread(target=DepositWatcher(setup.engine, dead, setup.token.address, setup.treasury,
                                                         1).run, args=(stop, 0.05))
        failing.start()
        watcher = threading.Thread(target=setup.watcher(confirmations=1).run, args=(stop, 0.05))
        watcher.start()
        setup.alice.transfer(setup.treasury, AMOUNT)
        deadline = time.monotonic() + 10
        while setup.balance() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        failing.join(5)
        watcher.join(5)
    assert not failing.is_alive() and not watcher.is_alive()
    assert setup.balance() == AMOUNT
    assert any("does not answer" in record.getMessage() for record in caplog.records), caplog.text
    assert_invariants(setup)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("token", "0x1234", "token must be a 20-byte hex address"),
    ("treasury", "0x" + "00" * 20, "treasury must not be the zero address"),
    ("confirmations", 0, "confirmations must be an integer >= 1"),
    ("max_blocks_per_scan", 0, "max_blocks_per_scan must be an integer >= 1"),
    ("start_block", -1, "start_block must be an integer >= 0"),
])
def test_bad_configuration_is_refused_with_the_parameter_named(anvil_client: ChainClient, field: str,
                                                               value: object, message: str) -> None:
    arguments: dict[str, object] = {"token": "0x" + "11" * 20, "treasury": "0x" + "22" * 20, "confirmations": 2}
    arguments[field] = value
    engine = create_engine("sqlite://")
    with pytest.raises(DepositConfigError, match=message):
        DepositWatcher(engine, anvil_client, **arguments)  # type: ignore[arg-type]
    engine.dispose()


def test_the_ledger_service_watches_deposits_and_credits_them_once(anvil_node: AnvilNode, anvil_client: ChainClient,
                                                                   tmp_path: Path) -> None:
    """`gateway ledger serve` runs the deposit watcher (no other process writes credits): an account created
    through its Admin API is credited once for a transfer from its deposit address."""
    rpc(anvil_client, "evm_setAutomine", True)
    state = tmp_path / "state"
    token, settler = ensure_settlement(anvil_client, state / "chain" / "deployment.json")  # as `gateway up` leaves it
    alice = PayoutToken(ChainClient(anvil_node.rpc_url, ANVIL_DEV_KEYS[1]), token.address)
    token.mint(alice.client.address, 10 * AMOUNT)
    env = {"GATEWAY_CHAIN_PORT": str(anvil_node.port), "GATEWAY_DEPOSITS_CONFIRMATIONS": "1",
           "GATEWAY_DEPOSITS_INTERVAL_SECONDS": "0.2", "GATEWAY_DEPOSITS_START_BLOCK": str(block_number(anvil_client)),
           "GATEWAY_SETTLE_PERIODIC": "false", "GATEWAY_AUTH": "true", "GATEWAY_LOCAL_CREDIT": "0"}
    ledger = LedgerProcess(state, "127.0.0.1", free_port(), env=env, log_file=tmp_path / "ledger.log").start()
    try:
        with admin_client(state, target=ledger.target) as client:
            local = client.bootstrap_local_key()
        with admin_client(state, local.path.read_text().strip(), ledger.target) as client:
            client.create_account("alice", alice.client.address)
            alice.transfer(settler.address, AMOUNT)
            deadline = time.monotonic() + 30
            while (balance := client.get_account("alice").balance) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert balance == AMOUNT, (tmp_path / "ledger.log").read_text()
            rpc(anvil_client, "anvil_mine", hex(5))
            time.sleep(1.0)  # several more scans
            assert client.get_account("alice").balance == AMOUNT, "credited once"
    finally:
        assert ledger.stop() == 0, (tmp_path / "ledger.log").read_text()
    engine = open_database(f"sqlite:///{state / 'ledger.db'}")
    try:
        Accounts(engine).check("alice")
        with Session(engine) as session:
            [deposit] = session.exec(select(Deposit)).all()
        assert (deposit.account_id, deposit.amount) == ("alice", AMOUNT) and deposit.entry_id is not None
    finally:
        engine.dispose()
