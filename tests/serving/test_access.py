"""AccessControl above the HTTP/gRPC doors, on a real SQLite ledger (the ledger's AccessDesk, without
gRPC between them) with a fake clock: what each `Authorization` value gets, when a revocation bites,
which limits apply, and what a refusal leaves. (The same behaviour through the ledger's gRPC API and
the running stack is tested in tests/serving/test_access_over_grpc.py and tests/test_access_stack.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

from ledger.accounts.accounts import Accounts
from ledger.accounts.api_keys import ApiKeys
from registry.models import Adapter
from ledger.accounts.transfers import PENDING, Transfers
from tests.support.desk_access import DeskAccess
from serving.config import AccessConfig
from serving.errors import InsufficientQuota, RateLimited, Unauthenticated
from storage.database import open_database
from tests.support.clock import ManualClock

PRICE = 1000  # base units per 1k tokens: a token costs 1


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[tuple[DeskAccess, str, ManualClock]]:
    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    with Session(engine) as session:
        session.add(Adapter(name="priced", base_model="base", uri="file:///x", owner="0x" + "11" * 20,
                            price_per_1k_tokens=str(PRICE), source="registered"))
        session.commit()
    Accounts(engine).create("acme")
    Accounts(engine).credit("acme", 100, "c1")
    key = ApiKeys(engine).create("acme").presented
    clock = ManualClock(100.0)
    config = AccessConfig(rate_requests_per_second=2, rate_tokens_per_minute=10_000, key_cache_seconds=1.0)
    yield DeskAccess(engine, config, clock), key, clock
    engine.dispose()


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "dgk-abc"])
def test_a_missing_or_malformed_authorization_is_401_asking_for_a_key(setup, header) -> None:  # noqa: ANN001
    access, _, _ = setup
    with pytest.raises(Unauthenticated, match="No API key provided"):
        access.authenticate(header)


def test_a_valid_key_names_its_account_and_a_revocation_bites_after_the_cache_time(setup) -> None:  # noqa: ANN001
    access, key, clock = setup
    caller = access.authenticate(f"bearer {key}")  # the scheme is case-insensitive, as in HTTP
    assert caller.account_id == "acme" and not caller.admin
    assert (caller.limit.requests_per_second, caller.limit.tokens_per_minute) == (2, 10_000), "gateway defaults"
    with pytest.raises(Unauthenticated, match="not valid"):
        access.authenticate(f"Bearer {key}x")
    ApiKeys(access.engine).revoke(caller.key_id)
    assert access.authenticate(f"Bearer {key}") == caller, "cached for key_cache_seconds"
    clock.now += 1.01
    with pytest.raises(Unauthenticated, match="not valid"):
        access.authenticate(f"Bearer {key}")


def test_a_keys_own_limits_win_over_the_defaults(setup) -> None:  # noqa: ANN001
    access, _, _ = setup
    own = ApiKeys(access.engine).create("acme", requests_per_second=7, tokens_per_minute=99).presented
    limit = access.authenticate(f"Bearer {own}").limit
    assert (limit.requests_per_second, limit.tokens_per_minute) == (7, 99)


def test_holds_cover_the_worst_case_and_a_refusal_keeps_nothing(setup) -> None:  # noqa: ANN001
    access, key, clock = setup
    transfers = Transfers(access.engine)
    caller = access.authenticate(f"Bearer {key}")
    assert access.admit(caller, "free-1", None, 40, 500).held == 0, "the base model holds nothing"
    admitted = access.admit(caller, "r-1", "priced", 10, 50)
    assert admitted.held == 60
    lease = transfers.list("acme")[0]
    assert (lease.kind, lease.amount) == ("lease", 100), "the replica leased what the account had (asked 64 x 60)"
    clock.now += 1  # the request bucket refills: the next refusal is for credit, not rate
    with pytest.raises(InsufficientQuota, match="may cost 60 base units and account 'acme' has 40"):
        access.admit(caller, "r-2", "priced", 10, 50)
    access.credit.flush()
    stored = {t.id: t for t in transfers.list("acme")}
    assert "r-2" not in stored, "the refused request holds nothing"
    assert (stored["r-1"].state, stored["r-1"].amount) == (PENDING, 60)
    access.finish(admitted, 10, 20, billed=True)  # it used 30 tokens: the lease gets 30 back locally
    clock.now += 1
    access.finish(access.admit(caller, "r-3", "priced", 5, 5), 5, 0, billed=False)  # no trace will bill it
    access.credit.flush()
    assert transfers.get("r-3") is None, "admitted and voided before it was reported: the ledger never sees it"
    assert Accounts(access.engine).balance("acme").balance == 100, "nothing is charged before a trace"
    transfers.check("acme")
    Accounts(access.engine).check("acme")


def test_rate_limits_refuse_with_retry_after_and_an_oversized_request_without(setup) -> None:  # noqa: ANN001
    access, key, _ = setup
    caller = access.authenticate(f"Bearer {key}")
    for i in range(2):  # the burst: 2 requests per second
        access.admit(caller, f"free-{i}", None, 1, 1)
    with pytest.raises(RateLimited) as limited:
        access.admit(caller, "free-3", None, 1, 1)
    assert limited.value.status == 429 and limited.value.headers["retry-after"] == "1"
    with pytest.raises(RateLimited, match="more than the key's limit of 10000 tokens per minute") as too_big:
        access.admit(caller, "big", None, 10, 10_000)
    assert too_big.value.headers == {} and too_big.value.param == "max_tokens"
