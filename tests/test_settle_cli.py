"""`gateway settle`, `gateway chain info` and `gateway ledger statement`: what each bad input gets.

`gateway settle` asks the ledger service (here in this process, on loopback), which runs the round
with its own settings. Paying for real (on anvil, through the running stack) is tested in
tests/test_ledger_stack.py, tests/test_settler_crash.py and tests/ledger/test_settler_anvil.py; these
need no chain.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from ledger.chain.anvil import ANVIL_DEV_KEYS
from tests.conftest import free_port
from tests.support.ledger_server import ServedLedger, served_ledger


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GATEWAY_ADMIN_KEY", "GATEWAY_LEDGER_ADDRESS", "GATEWAY_LEDGER_TOKEN", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def ledger(clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedLedger]:
    """The state directory's ledger service, with the operator's local admin key (`gateway settle` is
    administration)."""
    with served_ledger(tmp_path) as served:
        for name, value in served.env.items():
            monkeypatch.setenv(name, value)
        served.bootstrap()
        yield served


def run(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(["--state-dir", str(state), *args])
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("setting", "value", "named"), [
    ("GATEWAY_SETTLE_THRESHOLD", "0", "threshold"),
    ("GATEWAY_SETTLE_MAX_PAYEES", "401", "max_payees"),
    ("GATEWAY_SETTLE_FEE_BUMP_PERCENT", "5", "fee_bump_percent"),
])
def test_the_ledger_refuses_to_start_with_a_bad_settlement_setting_and_names_it(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setting: str, value: str,
        named: str) -> None:
    """Settlement runs in the ledger (`gateway ledger serve`): its settings are checked before it starts."""
    monkeypatch.setenv(setting, value)
    code, out, err = run(capsys, tmp_path, "ledger", "serve", "--port", str(free_port()))
    assert (code, out) == (2, "") and err.startswith(f"gateway: invalid setting {named}:")
    assert list(tmp_path.iterdir()) == [], "nothing was created: no token, no database"


def test_a_dry_run_needs_no_chain_and_changes_nothing(capsys: pytest.CaptureFixture[str], ledger: ServedLedger,
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_CHAIN_RPC_URL", f"http://127.0.0.1:{free_port()}")  # nothing answers there
    code, out, _ = run(capsys, tmp_path, "settle", "--dry-run", "--json")
    assert code == 0 and json.loads(out) == {"dry_run": True, "threshold": str(10**16), "batches": []}
    code, out, _ = run(capsys, tmp_path, "settle", "--dry-run", "--threshold", "5", "--json")
    assert code == 0 and json.loads(out)["threshold"] == "5"
    for bad in ("0", "-1", "1.5", "x"):
        code, out, err = run(capsys, tmp_path, "settle", "--dry-run", "--threshold", bad)
        assert (code, out) == (2, "") and "not a positive integer" in err


def test_settle_without_a_ledger_says_which_one_to_start(capsys: pytest.CaptureFixture[str], ledger: ServedLedger,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(free_port()))
    code, out, err = run(capsys, tmp_path, "settle", "--json")
    assert (code, out) == (1, "") and "is not answering" in err and "`gateway ledger serve`" in err


def test_a_remote_chain_needs_the_settler_address_and_an_answering_node(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ledger: ServedLedger,
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
