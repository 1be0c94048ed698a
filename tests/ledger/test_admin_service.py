"""The ledger's Admin API over a real server on loopback, through its client (`ledger.client.admin`).

The ledger verifies the admin key of every administrative call; each bad input gets its status and
message and stores nothing; a credit is idempotent by reference; the local admin key is written into
the ledger's state directory and never sent on the wire. Real SQLite (and PostgreSQL), real gRPC.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlmodel import Session, select

from ledger.client.admin import (AdminClient, AdminRefused, ApiKeyRefused, LedgerTokenRefused, LedgerUnreachable,
                                 admin_client)
from ledger.chain.anvil import ANVIL_DEV_KEYS
from ledger.client.token import bearer_metadata
from ledger.journal.fee_split import FeeSplitPolicy
from ledger.journal.journal import Journal
from ledger.models import AdapterAccess, ApiKey, JournalEntry, RequesterAccount
from tests.ledger.conftest import rivers_ledger
from tests.ledger.test_settler_anvil import earn
from tests.support.ledger_server import ServedLedger, served_ledger
from tests.support.ports import free_port
from wire.ledger.v1 import admin_pb2, admin_pb2_grpc

Code = grpc.StatusCode
BIG = 10**30  # base units: beyond 64 bits


@dataclass
class Admin:
    ledger: ServedLedger
    key: str  # the local admin key
    clients: ExitStack  # closes the clients' channels at the end of the test

    def client(self, key: str | None = "admin") -> AdminClient:
        """A client presenting `key` (default: the local admin key; None: no key)."""
        return self.clients.enter_context(self.ledger.admin(self.key if key == "admin" else key))

    def snapshot(self) -> dict[str, object]:
        """Everything an admin call could have written."""
        with Session(self.ledger.engine) as session:
            return {
                "accounts": sorted((a.id, a.balance, a.held, a.deposit_address)
                                   for a in session.exec(select(RequesterAccount)).all()),
                "keys": sorted((k.id, k.admin, k.revoked_at) for k in session.exec(select(ApiKey)).all()),
                "entries": len(session.exec(select(JournalEntry.id)).all()),
                "shared": sorted((r.adapter_name, r.account_id) for r in session.exec(select(AdapterAccess)).all()),
            }


@pytest.fixture()
def admin(database_url: str, tmp_path: Path) -> Iterator[Admin]:
    """A ledger with adapter 'river-guide' registered, serving its Admin API, and its local admin key."""
    state = tmp_path / "state"
    rivers_ledger(database_url, tmp_path).dispose()
    with served_ledger(state, database_url) as ledger, ExitStack() as clients:
        yield Admin(ledger, ledger.bootstrap(), clients)


def refused(call: Callable[[], object], error: type[Exception], code: grpc.StatusCode, text: str) -> Exception:
    with pytest.raises(error) as caught:
        call()
    assert caught.value.code == code and text in caught.value.message, caught.value  # type: ignore[attr-defined]
    return caught.value


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_administration_needs_a_live_admin_key_which_the_ledger_verifies(admin: Admin) -> None:
    ops = admin.client()
    user = ops.create_key("local", name="user").presented
    spare = ops.create_key("local", admin=True)
    assert ops.revoke_key(spare.key.id).revoked_at
    before = admin.snapshot()
    for key, code, reason in [(None, Code.UNAUTHENTICATED, "missing"),
                              ("dgk-nonsense", Code.UNAUTHENTICATED, "not_live"),
                              (spare.presented, Code.UNAUTHENTICATED, "not_live"),
                              (user, Code.PERMISSION_DENIED, "not_admin")]:
        client = admin.client(key)
        for call in (lambda: client.create_account("intruder"), lambda: client.credit("local", 5, "free-money"),
                     lambda: client.create_key("local", admin=True), client.list_keys, client.list_accounts,
                     lambda: client.revoke_key(spare.key.id), lambda: client.share_adapter("river-guide", "local"),
                     lambda: client.settle(dry_run=True), client.who_am_i):
            error = refused(call, ApiKeyRefused, code, "")
            assert error.reason == reason  # type: ignore[attr-defined]
            assert user not in error.message and spare.presented not in error.message  # type: ignore[attr-defined]
    assert admin.snapshot() == before, "refused calls stored nothing"
    assert admin.client(user).get_account("local").id == "local", "reading one account is not administration"
    assert ops.who_am_i().account_id == "local" and ops.who_am_i().admin


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_call_still_needs_the_ledger_token(admin: Admin) -> None:
    with grpc.insecure_channel(admin.ledger.target) as channel:
        client = AdminClient(channel, admin.ledger.target, "not-the-ledger-token-0123", admin.key)
        refused(lambda: client.create_account("acme"), LedgerTokenRefused, Code.UNAUTHENTICATED, "ledger token")
        refused(client.bootstrap_local_key, LedgerTokenRefused, Code.UNAUTHENTICATED, "ledger token")
    dead = f"127.0.0.1:{free_port()}"
    with admin_client(admin.ledger.state, admin.key, dead) as client:
        refused(client.list_accounts, LedgerUnreachable, Code.UNAVAILABLE, dead)
    assert admin.snapshot()["accounts"] == [("local", 10**24, 0, None)]


BAD_INPUT = [
    ("create_account", ("Bad Id",), Code.INVALID_ARGUMENT, "must be 1-48"),
    ("create_account", ("local",), Code.ALREADY_EXISTS, "account 'local' exists already"),
    ("create_account", ("other", "0x123"), Code.INVALID_ARGUMENT, "not an Ethereum address"),
    ("create_account", ("other", "0x" + "ab" * 20), Code.ALREADY_EXISTS, "belongs to another account"),
    ("get_account", ("ghost",), Code.NOT_FOUND, "no requester account 'ghost'"),
    ("credit", ("ghost", 5, "r"), Code.NOT_FOUND, "no requester account 'ghost'"),
    ("credit", ("acme", 0, "r"), Code.INVALID_ARGUMENT, "not a positive integer"),
    ("credit", ("acme", -5, "r"), Code.INVALID_ARGUMENT, "not a positive integer"),
    ("credit", ("acme", 5, ""), Code.INVALID_ARGUMENT, "reference of 1-128 characters"),
    ("credit", ("acme", 5, "r" * 129), Code.INVALID_ARGUMENT, "reference of 1-128 characters"),
    ("credit", ("acme", 8, "seed"), Code.FAILED_PRECONDITION, "already credited with other terms"),
    ("share_adapter", ("nope", "acme"), Code.NOT_FOUND, "no registered adapter 'nope'"),
    ("share_adapter", ("river-guide", "ghost"), Code.NOT_FOUND, "no requester account 'ghost'"),
    ("unshare_adapter", ("river-guide", "ghost"), Code.NOT_FOUND, "no requester account 'ghost'"),
    ("create_key", ("ghost",), Code.NOT_FOUND, "no requester account 'ghost'"),
    ("create_key", ("acme",), Code.INVALID_ARGUMENT, "requests per second", {"requests_per_second": 0.0}),
    ("create_key", ("acme",), Code.INVALID_ARGUMENT, "requests per second", {"requests_per_second": float("nan")}),
    ("create_key", ("acme",), Code.INVALID_ARGUMENT, "tokens per minute", {"tokens_per_minute": 0}),
    ("create_key", ("acme",), Code.INVALID_ARGUMENT, "at most 64 characters", {"name": "n" * 65}),
    ("revoke_key", ("key_nope",), Code.NOT_FOUND, "no API key 'key_nope'"),
    ("settle", (), Code.INVALID_ARGUMENT, "not a positive integer", {"dry_run": True, "threshold": 0}),
]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda case: f"{case[0]}-{case[3][:24]}")
def test_each_bad_input_gets_its_status_and_stores_nothing(admin: Admin, case: tuple) -> None:
    method, args, code, text, *options = case
    ops = admin.client()
    ops.create_account("acme", "0x" + "ab" * 20)
    ops.credit("acme", 7, "seed")
    before = admin.snapshot()
    refused(lambda: getattr(ops, method)(*args, **(options[0] if options else {})), AdminRefused, code, text)
    assert admin.snapshot() == before, "nothing stored, nothing changed"


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_credit_is_idempotent_by_reference(admin: Admin) -> None:
    ops = admin.client()
    assert ops.create_account("acme").balance == 0
    first = ops.credit("acme", BIG, "invoice-1")
    assert first.created and first.account.balance == first.account.available == BIG
    again = ops.credit("acme", BIG, "invoice-1")
    assert not again.created and again.entry_id == first.entry_id and again.account.balance == BIG
    refused(lambda: ops.credit("acme", BIG + 1, "invoice-1"), AdminRefused, Code.FAILED_PRECONDITION,
            "already credited with other terms")
    second = ops.credit("acme", 5, "invoice-2")
    assert second.created and second.entry_id != first.entry_id
    assert admin.client(None).get_account("acme").balance == BIG + 5
    assert [a.id for a in ops.list_accounts()] == ["acme", "local"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_adapter_is_shared_and_unshared(admin: Admin) -> None:
    ops = admin.client()
    ops.create_account("acme")
    ops.create_account("beta")
    assert ops.share_adapter("river-guide", "acme") == ["acme"]
    assert ops.share_adapter("river-guide", "beta") == ["acme", "beta"]
    assert ops.share_adapter("river-guide", "beta") == ["acme", "beta"], "sharing twice changes nothing"
    assert ops.unshare_adapter("river-guide", "acme") == ["beta"]
    assert ops.unshare_adapter("river-guide", "beta") == [], "public again"
    assert admin.snapshot()["shared"] == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_keys_are_created_listed_without_secrets_and_revoked_but_never_the_last_admin_key(admin: Admin) -> None:
    ops = admin.client()
    ops.create_account("acme")
    new = ops.create_key("acme", name="ci", requests_per_second=2.5, tokens_per_minute=6000)
    assert new.presented.startswith(f"dgk-{new.key.id.removeprefix('key_')}-")
    assert (new.key.requests_per_second, new.key.tokens_per_minute, new.key.admin) == (2.5, 6000, False)
    [listed] = ops.list_keys("acme")
    assert listed == new.key and listed.created_at.endswith("+00:00") and listed.revoked_at is None
    assert admin.client(new.presented).get_account("acme").id == "acme"
    revoked = ops.revoke_key(new.key.id)
    assert revoked.revoked_at and ops.revoke_key(new.key.id).revoked_at == revoked.revoked_at, "the first time kept"
    [local] = [key for key in ops.list_keys() if key.account_id == "local"]
    before = admin.snapshot()
    refused(lambda: ops.revoke_key(local.id), AdminRefused, Code.FAILED_PRECONDITION, "last live admin key")
    assert admin.snapshot() == before and ops.who_am_i().id == local.id, "the key still administers"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_local_key_is_written_into_the_ledgers_state_directory_and_never_sent(admin: Admin) -> None:
    path = admin.ledger.state / "local-api-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and admin.key == path.read_text().strip()
    with grpc.insecure_channel(admin.ledger.target) as channel:  # the raw reply: what travels on the wire
        stub = admin_pb2_grpc.AdminStub(channel)
        metadata = bearer_metadata(admin.ledger.token)
        reply = stub.BootstrapLocalKey(admin_pb2.BootstrapLocalKeyRequest(), metadata=metadata, timeout=10)
        assert (reply.created, reply.path, reply.problem) == (False, str(path), ""), "an existing file is kept"
        assert path.read_text().strip() == admin.key
        admin.client().revoke_key(admin.client().create_key("local", admin=True).key.id)  # another one comes and goes
        path.unlink()
        before = admin.snapshot()["entries"]
        reply = stub.BootstrapLocalKey(admin_pb2.BootstrapLocalKeyRequest(), metadata=metadata, timeout=10)
        fresh = path.read_text().strip()
        assert reply.created and fresh != admin.key and fresh not in reply.SerializeToString().decode("latin-1")
        assert reply.credit == str(10**24) and admin.snapshot()["entries"] == before, "the local credit is made once"
        assert admin.client(fresh).who_am_i().id == reply.key_id
        path.write_text("dgk-000000000000-" + "x" * 43 + "\n")  # a key of no ledger
        reply = stub.BootstrapLocalKey(admin_pb2.BootstrapLocalKeyRequest(), metadata=metadata, timeout=10)
        assert not reply.created and "not a live key of this ledger" in reply.problem and "remove the file" in \
            reply.problem


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_dry_run_plans_what_is_payable_and_stores_nothing(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    earn(Journal(admin.ledger.engine, FeeSplitPolicy(contributors_bps=7000, owner_bps=2000)), "t-1")
    ops = admin.client()
    before = admin.snapshot()
    assert ops.settle(dry_run=True, threshold=BIG).batches == (), "no balance reaches this threshold"
    plan = ops.settle(dry_run=True)
    [batch] = plan.batches
    assert plan.threshold == 10**16, "the ledger's GATEWAY_SETTLE_THRESHOLD"
    assert batch.payees == 3 == len(batch.lines) and batch.total == sum(amount for _, amount in batch.lines)
    assert admin.snapshot() == before
    monkeypatch.setenv("GATEWAY_CHAIN_RPC_URL", f"http://127.0.0.1:{free_port()}")  # a remote chain: read per round
    monkeypatch.setenv("GATEWAY_CHAIN_OPERATOR_KEY", ANVIL_DEV_KEYS[0])
    monkeypatch.delenv("GATEWAY_SETTLE_SETTLER", raising=False)
    error = refused(lambda: ops.settle(threshold=1), AdminRefused, Code.FAILED_PRECONDITION, "GATEWAY_SETTLE_SETTLER")
    assert ANVIL_DEV_KEYS[0].removeprefix("0x") not in str(error), "the operator key never shows"
    assert admin.snapshot() == before
