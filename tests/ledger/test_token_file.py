"""GATEWAY_LEDGER_TOKEN_FILE: the ledger token read from a file someone else provides (a mounted secret),
never written, never named by its value."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ledger.client.config import LedgerClientConfig
from ledger.client.token import TOKEN_ENV, LedgerTokenInvalid, LedgerTokenMissing, read_ledger_token
from ledger.service import ensure_ledger_token
from statedir.layout import StateLayout

TOKEN = "mounted-secret-token-0123456789"


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("GATEWAY_LEDGER_TOKEN_FILE", raising=False)


def test_the_token_file_wins_over_the_state_directory_and_the_ledger_writes_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text(TOKEN + "\n")
    secret.chmod(0o400)
    state = tmp_path / "state"
    assert read_ledger_token(state, LedgerClientConfig(token_file=secret)) == TOKEN
    monkeypatch.setenv("GATEWAY_LEDGER_TOKEN_FILE", str(secret))
    assert ensure_ledger_token(state) == TOKEN and read_ledger_token(state) == TOKEN
    assert not StateLayout(state).ledger_token.exists()


def test_a_missing_or_damaged_token_file_is_refused_by_name_without_its_content(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(LedgerTokenMissing, match=str(missing)):
        read_ledger_token(tmp_path, LedgerClientConfig(token_file=missing))
    damaged = tmp_path / "damaged"
    damaged.write_text("short secret")
    with pytest.raises(LedgerTokenInvalid, match=str(damaged)) as refused:
        read_ledger_token(tmp_path, LedgerClientConfig(token_file=damaged))
    assert "short secret" not in str(refused.value)


def test_the_token_and_a_token_file_together_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(ValidationError, match="not both"):
        LedgerClientConfig(token_file=tmp_path / "token")
