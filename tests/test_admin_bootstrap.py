"""Administration never switches off: no state of the database lets an admin command run without a
live admin key, the last live admin key cannot be revoked, and the first one comes from the state
directory (`gateway keys bootstrap`, as `gateway up` does), shown once and only on a terminal.

Real CLI (`gateway.cli.main` and the installed `gateway` executable), a real ledger service (in this
process, on loopback) that the CLI reaches through its Admin API, real databases.
"""

from __future__ import annotations

import json
import os
import pty
import select as select_fd
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from gateway.cli import main
from ledger.accounts.accounts import Accounts
from ledger.accounts.api_keys import ApiKeys, LastAdminKey
from ledger.models import ApiKey, JournalEntry, RequesterAccount
from storage.database import database_url, open_database
from tests.support.ledger_server import ServedLedger, served_ledger

GATEWAY = Path(sys.executable).with_name("gateway")


@pytest.fixture(autouse=True)
def no_admin_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GATEWAY_ADMIN_KEY", "DATABASE_URL", "GATEWAY_LEDGER_ADDRESS", "GATEWAY_LEDGER_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def ledger(no_admin_key_in_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedLedger]:
    """The state directory's ledger service, where the CLI (and its subprocesses) find it."""
    with served_ledger(tmp_path) as served:
        for name, value in served.env.items():
            monkeypatch.setenv(name, value)
        yield served


def run(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--state-dir", str(state), *args])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(state: Path) -> dict[str, object]:
    """Everything an admin command could have written: accounts, keys (with revocations), journal entries."""
    engine = open_database(database_url(state))
    try:
        with Session(engine) as session:
            return {
                "accounts": [(a.id, a.balance) for a in session.exec(select(RequesterAccount)).all()],
                "keys": sorted((k.id, k.admin, k.revoked_at) for k in session.exec(select(ApiKey)).all()),
                "entries": len(session.exec(select(JournalEntry.id)).all()),
            }
    finally:
        engine.dispose()


def bootstrap(capsys: pytest.CaptureFixture[str], state: Path) -> dict:
    code, out, err = run(capsys, state, "keys", "bootstrap", "--json")
    assert code == 0, err
    return json.loads(out)


ADMIN_COMMANDS = [
    ("accounts", "create", "intruder"),
    ("accounts", "credit", "local", "5", "--ref", "free-money"),
    ("keys", "create", "--account", "local", "--admin"),
    ("keys", "list"),
    ("settle", "--dry-run"),
]


def test_bootstrap_writes_an_owner_only_key_file_once_and_never_prints_the_key_off_a_terminal(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, ledger: ServedLedger) -> None:
    created = bootstrap(capsys, tmp_path)
    path = tmp_path / "local-api-key"
    key = path.read_text().strip()
    assert created["created"] and created["path"] == str(path) and created["account"] == "local"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "key" not in created and key not in json.dumps(created), "--json never carries the key"
    code, out, _ = run(capsys, tmp_path, "keys", "bootstrap")  # again, for people, still not a terminal
    assert code == 0 and "nothing created" in out and key not in out
    assert path.read_text().strip() == key, "an existing key file is never replaced"
    engine = open_database(database_url(tmp_path))
    [row] = ApiKeys(engine).list()
    engine.dispose()
    assert row.id == created["id"] and row.admin and row.revoked_at is None


def test_the_key_is_shown_once_on_a_terminal(tmp_path: Path, ledger: ServedLedger) -> None:
    """`gateway keys bootstrap` with stdout on a pseudo-terminal prints the key (and `gateway up` does the same)."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([str(GATEWAY), "--state-dir", str(tmp_path), "keys", "bootstrap"],
                                   stdout=follower, stderr=subprocess.PIPE, env={**os.environ})
        os.close(follower)
        shown = b""
        while True:
            ready, _, _ = select_fd.select([leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process exited
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(60) == 0, process.stderr.read() if process.stderr else ""
    finally:
        os.close(leader)
    key = (tmp_path / "local-api-key").read_text().strip()
    assert key in shown.decode() and "it is not printed again" in shown.decode()


def test_revoking_the_last_admin_key_is_refused_and_stores_nothing(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   ledger: ServedLedger) -> None:
    first = bootstrap(capsys, tmp_path)["id"]
    before = snapshot(tmp_path)
    code, out, err = run(capsys, tmp_path, "keys", "revoke", first)
    assert (code, out) == (2, "") and len(err.splitlines()) == 1 and err.startswith("gateway: ")
    assert "last live admin key" in err and "create another admin key first" in err
    assert snapshot(tmp_path) == before, "nothing stored"
    key = (tmp_path / "local-api-key").read_text().strip()
    engine = open_database(database_url(tmp_path))
    keys = ApiKeys(engine)
    assert keys.verify(key) is not None and keys.get(first).revoked_at is None, "the key still works"
    assert run(capsys, tmp_path, "accounts", "create", "acme")[0] == 0, "and still administers"
    # With a second admin key the first may go; then the second is the last one.
    code, out, _ = run(capsys, tmp_path, "keys", "create", "--account", "local", "--admin", "--json")
    second = json.loads(out)
    code, out, err = run(capsys, tmp_path, "keys", "revoke", first, "--json")
    assert code == 0 and json.loads(out)["revoked_at"], err
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", second["key"])  # the local key is revoked now
    before = snapshot(tmp_path)
    code, out, err = run(capsys, tmp_path, "keys", "revoke", second["id"])
    assert (code, out) == (2, "") and "last live admin key" in err
    assert snapshot(tmp_path) == before and keys.verify(second["key"]).id == second["id"]
    assert run(capsys, tmp_path, "keys", "revoke", first)[0] == 0, "revoking a revoked key changes nothing"
    assert snapshot(tmp_path) == before
    engine.dispose()


@pytest.mark.parametrize("gone", ["revoked", "deleted"])
def test_with_every_admin_key_gone_from_the_database_admin_commands_still_need_one(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, gone: str, ledger: ServedLedger) -> None:
    bootstrap(capsys, tmp_path)
    assert run(capsys, tmp_path, "accounts", "create", "acme")[0] == 0
    engine = open_database(database_url(tmp_path))
    with engine.begin() as connection:  # not through the CLI: someone with the database file
        if gone == "revoked":
            connection.execute(text("UPDATE apikey SET revoked_at = CURRENT_TIMESTAMP WHERE admin"))
        else:
            connection.execute(text("DELETE FROM apikey WHERE admin"))
    engine.dispose()
    before = snapshot(tmp_path)
    local = tmp_path / "local-api-key"
    stale = local.read_text()
    for args in ADMIN_COMMANDS:  # with the local key file, whose key is no longer live
        code, out, err = run(capsys, tmp_path, *args)
        assert (code, out) == (2, "") and "not a live key of this ledger" in err and "bootstrap" in err, args
    local.unlink()
    for args in ADMIN_COMMANDS:  # with no key at all
        code, out, err = run(capsys, tmp_path, *args)
        assert (code, out) == (2, "") and "needs an admin API key" in err and "gateway keys bootstrap" in err, args
        assert not local.exists(), "a refusal creates no key"
    assert snapshot(tmp_path) == before, "refused commands stored nothing"
    # The way back goes through the state directory: a stale key file must be removed by its owner first.
    local.write_text(stale)
    code, out, err = run(capsys, tmp_path, "keys", "bootstrap")
    assert (code, out) == (2, "") and "remove the file" in err and local.read_text() == stale
    local.unlink()
    bootstrap(capsys, tmp_path)
    assert run(capsys, tmp_path, "accounts", "create", "rescued")[0] == 0


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_two_admins_revoking_each_other_at_once_leave_one(database_url: str) -> None:
    engine = open_database(database_url)
    try:
        Accounts(engine).create("ops")
        keys = ApiKeys(engine)
        admins = [keys.create("ops", admin=True).key.id for _ in range(2)]
        outcomes: list[object] = []
        start = threading.Barrier(2)

        def revoke(key: str) -> None:
            start.wait()
            try:
                outcomes.append(keys.revoke(key).id)
            except LastAdminKey as refused:
                outcomes.append(refused)

        threads = [threading.Thread(target=revoke, args=(key,)) for key in admins]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(type(o).__name__ for o in outcomes) == ["LastAdminKey", "str"]
        live = [k.id for k in keys.list() if k.admin and k.revoked_at is None]
        assert len(live) == 1, "exactly one admin key is left"
        with pytest.raises(LastAdminKey):
            keys.revoke(live[0])
        assert keys.get(live[0]).revoked_at is None
    finally:
        engine.dispose()
