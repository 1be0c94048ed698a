"""`gateway accounts …` and `gateway keys …`: what users get, and what each bad input gets.

The commands ask a real ledger service (in this process, on loopback) through its Admin API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from gateway.cli import main
from ledger.models import ApiKey, JournalEntry, RequesterAccount
from tests.support.ledger_server import ServedLedger, served_ledger
from tests.support.ports import free_port


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedLedger]:
    """The state directory's ledger service, where the CLI finds it (GATEWAY_LEDGER_PORT)."""
    for name in ("GATEWAY_ADMIN_KEY", "GATEWAY_LEDGER_ADDRESS", "GATEWAY_LEDGER_TOKEN", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with served_ledger(tmp_path) as served:
        for name, value in served.env.items():
            monkeypatch.setenv(name, value)
        yield served


@pytest.fixture(autouse=True)
def operator(ledger: ServedLedger) -> str:
    """The operator's local admin key in the state directory (what `gateway up` leaves at first start)."""
    return ledger.bootstrap()


def stored(ledger: ServedLedger) -> dict[str, object]:
    """What the ledger's database holds of accounts, keys and journal entries."""
    with Session(ledger.engine) as session:
        return {"accounts": sorted((a.id, a.balance) for a in session.exec(select(RequesterAccount)).all()),
                "keys": sorted((k.id, k.revoked_at) for k in session.exec(select(ApiKey)).all()),
                "entries": len(session.exec(select(JournalEntry.id)).all())}


def run(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(["--state-dir", str(state), *args])
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_accounts_are_created_credited_once_per_reference_and_listed(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    assert run(capsys, tmp_path, "accounts", "create", "acme", "--json")[0] == 0
    code, out, _ = run(capsys, tmp_path, "accounts", "credit", "acme", str(10**30), "--ref", "inv-1", "--json")
    first = json.loads(out)
    assert code == 0 and first["created"] and first["available"] == str(10**30)
    code, out, _ = run(capsys, tmp_path, "accounts", "credit", "acme", str(10**30), "--ref", "inv-1", "--json")
    again = json.loads(out)
    assert code == 0 and not again["created"] and again["entry_id"] == first["entry_id"]
    code, out, _ = run(capsys, tmp_path, "accounts", "balance", "acme", "--json")
    assert json.loads(out) == {"id": "acme", "deposit_address": None, "balance": str(10**30), "held": "0",
                               "available": str(10**30)}
    code, out, _ = run(capsys, tmp_path, "accounts", "list", "--json")
    assert [a["id"] for a in json.loads(out)["accounts"]] == ["acme", "local"]


def test_a_key_is_printed_once_listed_without_its_secret_and_revoked(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    run(capsys, tmp_path, "accounts", "create", "acme")
    code, out, _ = run(capsys, tmp_path, "keys", "create", "--account", "acme", "--name", "ci",
                       "--tokens-per-minute", "6000", "--json")
    created = json.loads(out)
    assert code == 0 and created["key"].startswith("dgk-") and created["tokens_per_minute"] == 6000
    code, out, _ = run(capsys, tmp_path, "keys", "list", "--account", "acme", "--json")
    assert created["key"] not in out and created["key"].split("-", 2)[2] not in out
    [listed] = json.loads(out)["keys"]
    assert listed["id"] == created["id"] and listed["created_at"].endswith("+00:00"), "times name their zone"
    code, out, _ = run(capsys, tmp_path, "keys", "revoke", created["id"], "--json")
    assert code == 0 and json.loads(out)["revoked_at"].endswith("+00:00")


@pytest.mark.parametrize(("args", "message"), [
    (("accounts", "create", "Bad Id"), "must be 1-48"),
    (("accounts", "balance", "ghost"), "no requester account 'ghost'"),
    (("accounts", "credit", "ghost", "5", "--ref", "r"), "no requester account 'ghost'"),
    (("accounts", "credit", "acme", "0", "--ref", "r"), "not a positive integer"),
    (("accounts", "credit", "acme", "1.5", "--ref", "r"), "not a positive integer"),
    (("accounts", "credit", "acme", "5"), "--ref"),
    (("accounts", "create", "other", "--deposit-address", "0x123"), "address"),
    (("accounts", "create", "acme"), "account 'acme' exists already"),
    (("accounts", "credit", "acme", "8", "--ref", "seed"), "already credited with other terms"),
    (("accounts", "share", "acme", "no-such-adapter"), "no registered adapter 'no-such-adapter'"),
    (("keys", "create", "--account", "ghost"), "no requester account 'ghost'"),
    (("keys", "create", "--account", "acme", "--requests-per-second", "0"), "requests per second"),
    (("keys", "revoke", "key_nope"), "no API key 'key_nope'"),
])
def test_bad_input_gets_one_line_and_exit_2_and_changes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                ledger: ServedLedger, args: tuple[str, ...],
                                                                message: str) -> None:
    run(capsys, tmp_path, "accounts", "create", "acme")
    run(capsys, tmp_path, "accounts", "credit", "acme", "7", "--ref", "seed")
    before = stored(ledger)
    code, out, err = run(capsys, tmp_path, *args)
    assert code == 2 and out == "" and message in err
    code, out, _ = run(capsys, tmp_path, "accounts", "balance", "acme", "--json")
    assert json.loads(out)["balance"] == "7", "nothing stored is lost or changed"
    assert stored(ledger) == before


def test_admin_commands_need_a_live_admin_key(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, operator: str) -> None:
    admin = json.loads(run(capsys, tmp_path, "keys", "create", "--account", "local", "--admin", "--json")[1])["key"]
    (tmp_path / "local-api-key").unlink()  # from here on only what the environment presents counts
    for presented in (None, "dgk-nonsense"):
        if presented:
            monkeypatch.setenv("GATEWAY_ADMIN_KEY", presented)
        for args in (("accounts", "create", "acme"), ("keys", "create", "--account", "local"),
                     ("accounts", "credit", "local", "5", "--ref", "r"), ("settle", "--dry-run")):
            code, out, err = run(capsys, tmp_path, *args)
            assert (code, out) == (2, "") and "needs an admin API key" in err, args
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", admin)
    user = json.loads(run(capsys, tmp_path, "keys", "create", "--account", "local", "--json")[1])["key"]
    assert run(capsys, tmp_path, "accounts", "create", "acme")[0] == 0
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", user)
    code, _, err = run(capsys, tmp_path, "accounts", "create", "other")
    assert code == 2 and "is not an admin key" in err
    assert run(capsys, tmp_path, "accounts", "balance", "acme")[0] == 0, "reading a balance is not administration"
    monkeypatch.delenv("GATEWAY_ADMIN_KEY")
    (tmp_path / "local-api-key").write_text(operator + "\n")  # the operator's own file works again
    assert run(capsys, tmp_path, "accounts", "create", "third")[0] == 0
    code, out, _ = run(capsys, tmp_path, "accounts", "list", "--json")
    assert [a["id"] for a in json.loads(out)["accounts"]] == ["acme", "local", "third"], "refused ones stored nothing"


def test_without_a_ledger_the_commands_say_which_one_to_start(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             ledger: ServedLedger,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = stored(ledger)
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(free_port()))  # nothing answers there
    for args in (("accounts", "create", "acme"), ("accounts", "balance", "local"), ("keys", "list"),
                 ("keys", "bootstrap"), ("settle", "--dry-run")):
        code, out, err = run(capsys, tmp_path, *args)
        assert (code, out) == (1, "") and "is not answering" in err and "`gateway ledger serve`" in err, args
    fresh = tmp_path / "fresh"  # no ledger ever ran here: no token either
    code, _, err = run(capsys, fresh, "accounts", "balance", "local")
    assert code == 1 and "is not answering" in err and "`gateway up`" in err
    assert stored(ledger) == before
