"""`gateway settle`, `gateway chain info` and `gateway ledger statement`: what each bad input gets.

Paying for real (on anvil, through the running stack) is tested in tests/test_ledger_stack.py and
tests/ledger/test_settler_anvil.py; these need no chain and no ledger service.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from ledger.chain.anvil import ANVIL_DEV_KEYS
from tests.conftest import free_port
from tests.support.credentials import bootstrap_admin


@pytest.fixture(autouse=True)
def operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gateway settle` is administration: the operator's local admin key is in the state directory."""
    monkeypatch.delenv("GATEWAY_ADMIN_KEY", raising=False)
    bootstrap_admin(tmp_path)


def run(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--state-dir", str(state), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("setting", "value", "named"), [
    ("GATEWAY_SETTLE_THRESHOLD", "0", "threshold"),
    ("GATEWAY_SETTLE_MAX_PAYEES", "401", "max_payees"),
    ("GATEWAY_SETTLE_FEE_BUMP_PERCENT", "5", "fee_bump_percent"),
])
def test_bad_settlement_settings_are_named(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path, setting: str, value: str, named: str) -> None:
    monkeypatch.setenv(setting, value)
    code, out, err = run(capsys, tmp_path, "settle", "--json")
    assert (code, out) == (2, "") and err.startswith(f"gateway: invalid setting {named}:")


def test_a_dry_run_needs_no_chain_and_changes_nothing(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_CHAIN_RPC_URL", f"http://127.0.0.1:{free_port()}")  # nothing answers there
    code, out, _ = run(capsys, tmp_path, "settle", "--dry-run", "--json")
    assert code == 0 and json.loads(out) == {"dry_run": True, "threshold": str(10**16), "batches": []}


def test_a_remote_chain_needs_the_settler_address_and_an_answering_node(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("GATEWAY_CHAIN_RPC_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GATEWAY_CHAIN_OPERATOR_KEY", ANVIL_DEV_KEYS[0])
    code, out, err = run(capsys, tmp_path, "settle", "--json")
    assert (code, out) == (2, "") and "GATEWAY_SETTLE_SETTLER" in err
    monkeypatch.setenv("GATEWAY_SETTLE_SETTLER", "0x" + "11" * 20)
    code, out, err = run(capsys, tmp_path, "settle", "--json")
    assert (code, out) == (1, "") and "does not answer" in err
    assert ANVIL_DEV_KEYS[0].removeprefix("0x") not in err, "the operator key never shows"


@pytest.mark.parametrize("args", [["--limit", "0"], ["--limit", "10001"], ["--before", "-1"]])
def test_statement_bounds_are_checked_before_asking_the_ledger(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                args: list[str]) -> None:
    code, out, err = run(capsys, tmp_path, "ledger", "statement", "0x" + "1" * 40, *args)
    assert (code, out) == (2, "") and "--limit must be in 1..10000" in err
