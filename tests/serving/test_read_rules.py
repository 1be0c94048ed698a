"""Who may read a trace and the operator views: DeskAccess's rules on a real SQLite ledger (its AccessDesk).
(The same rules through both running doors are tested in tests/test_read_ownership.py and
tests/serving/test_replicas.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.accounts.accounts import Accounts
from ledger.accounts.api_keys import ApiKeys
from tests.support.desk_access import DeskAccess
from serving.config import AccessConfig
from serving.errors import Forbidden, TraceNotFound
from storage.database import open_database


@pytest.fixture()
def access(tmp_path: Path) -> Iterator[DeskAccess]:
    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    for account in ("acme", "other"):
        Accounts(engine).create(account)
    yield DeskAccess(engine, AccessConfig())
    engine.dispose()


def caller(access: DeskAccess, account: str, admin: bool = False):  # noqa: ANN201
    return access.authenticate(f"Bearer {ApiKeys(access.engine).create(account, admin=admin).presented}")


def test_a_trace_is_for_its_accounts_keys_and_admin_keys(access: DeskAccess) -> None:
    maker, sibling = caller(access, "acme"), caller(access, "acme")
    stranger, admin = caller(access, "other"), caller(access, "other", admin=True)
    assert access.may_read(maker, maker.key_id) and access.may_read(sibling, maker.key_id)
    assert access.may_read(admin, maker.key_id)
    assert not access.may_read(stranger, maker.key_id)
    assert not access.may_read(None, maker.key_id), "no caller with auth on: nothing"
    assert not access.may_read(stranger, None) and access.may_read(admin, None), "anonymous traces: admins only"
    assert not access.may_read(stranger, "key_000000000000"), "an unknown requester is nobody's"
    with pytest.raises(TraceNotFound) as refused:
        access.check_read(stranger, "cmpl-abc", maker.key_id)
    assert refused.value.to_body() == TraceNotFound("cmpl-abc").to_body(), "the body of an unknown id"
    access.check_read(sibling, "cmpl-abc", maker.key_id)


def test_a_revoked_keys_traces_stay_its_accounts(access: DeskAccess) -> None:
    maker, sibling = caller(access, "acme"), caller(access, "acme")
    ApiKeys(access.engine).revoke(maker.key_id)
    assert access.may_read(sibling, maker.key_id)
    assert not access.may_read(caller(access, "other"), maker.key_id)


def test_operator_views_need_an_admin_key(access: DeskAccess) -> None:
    access.require_admin(caller(access, "acme", admin=True))
    for who in (caller(access, "acme"), None):
        with pytest.raises(Forbidden) as refused:
            access.require_admin(who)
        assert refused.value.status == 403 and refused.value.code == "admin_key_required"


def test_with_auth_off_every_local_client_reads_everything(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    open_access = DeskAccess(engine, AccessConfig(auth=False))
    assert open_access.may_read(None, "key_000000000000") and open_access.may_read(None, None)
    open_access.require_admin(None)
    engine.dispose()
