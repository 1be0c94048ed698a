"""API keys: shown once, stored hashed, verified in constant time, revocable; bad input refused clearly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlmodel import Session, select

from ledger.accounts.accounts import Accounts
from ledger.accounts.api_keys import ApiKeys, secret_sha256
from ledger.models import ApiKey
from storage.database import open_database


@pytest.fixture()
def keys(tmp_path) -> Iterator[ApiKeys]:  # noqa: ANN001
    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    Accounts(engine).create("acme")
    yield ApiKeys(engine)
    engine.dispose()


def test_a_key_is_stored_only_as_a_hash_and_verifies(keys: ApiKeys) -> None:
    new = keys.create("acme", name="ci", requests_per_second=5, tokens_per_minute=6000)
    assert new.presented.startswith("dgk-") and new.key.id.startswith("key_")
    secret = new.presented.split("-", 2)[2]  # the secret may contain "-" itself
    with Session(keys.engine) as session:
        [row] = session.exec(select(ApiKey)).all()
    assert row.secret_sha256 == secret_sha256(secret) and secret not in repr(row.model_dump())
    assert keys.verify(new.presented).id == new.key.id
    assert (row.requests_per_second, row.tokens_per_minute, row.admin) == (5, 6000, False)


def test_wrong_malformed_unknown_and_revoked_keys_do_not_verify(keys: ApiKeys) -> None:
    new = keys.create("acme")
    hex_part = new.key.id.removeprefix("key_")
    wrong_secret = f"dgk-{hex_part}-{'A' * 43}"
    unknown_id = new.presented.replace(hex_part, "0" * 12)
    for presented in (wrong_secret, unknown_id, "", "Bearer x", new.presented + "x", new.presented.upper()):
        assert keys.verify(presented) is None, presented
    revoked = keys.revoke(new.key.id)
    assert revoked.revoked_at is not None and keys.revoke(new.key.id).revoked_at == revoked.revoked_at
    assert keys.verify(new.presented) is None


def test_bad_requests_for_keys_get_clear_errors(keys: ApiKeys) -> None:
    with pytest.raises(ValueError, match="no requester account 'ghost'"):
        keys.create("ghost")
    for rps in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="requests per second"):
            keys.create("acme", requests_per_second=rps)
    with pytest.raises(ValueError, match="tokens per minute"):
        keys.create("acme", tokens_per_minute=0)
    with pytest.raises(ValueError, match="at most 64"):
        keys.create("acme", name="n" * 65)
    with pytest.raises(ValueError, match="no API key 'key_nope'"):
        keys.revoke("key_nope")
    assert keys.list() == []
