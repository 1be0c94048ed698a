"""The client of the ledger's Admin API (`gateway.ledger.v1.Admin`, proto/wire/ledger/v1/admin.proto).

Typed methods over the stub: amounts come back as `int`, refusals as the errors below. Every call
carries the ledger's bearer token; administrative calls also carry the admin API key the caller
presents (`x-api-key`), which the ledger verifies. The key's value is never part of an error.

    LedgerCallError                the ledger refused or failed the call (`code`, `message`)
    ├── LedgerUnreachable          nothing answers at `target` (UNAVAILABLE, DEADLINE_EXCEEDED)
    ├── LedgerTokenRefused         the ledger's bearer token was missing or wrong (UNAUTHENTICATED)
    ├── ApiKeyRefused              the admin key: "missing", "not_live" or "not_admin" (`reason`)
    └── AdminRefused               bad input or a rule of the ledger: INVALID_ARGUMENT, NOT_FOUND,
                                   ALREADY_EXISTS, FAILED_PRECONDITION; nothing was stored
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ledger.client.config import LedgerClientConfig
from ledger.client.token import bearer_metadata, read_ledger_token
from wire.ledger.v1 import admin_pb2, admin_pb2_grpc

API_KEY_METADATA = "x-api-key"
"""Call metadata carrying the admin API key (`dgk-…`)."""
REFUSED_METADATA = "x-api-key-refused"
"""Trailing metadata of a call the admin check refused: "missing", "not_live" or "not_admin"."""
CALL_TIMEOUT_SECONDS = 30.0
SETTLE_TIMEOUT_SECONDS = 660.0  # a round runs up to 600 s in the ledger, then answers
REFUSED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                 grpc.StatusCode.FAILED_PRECONDITION)


class LedgerCallError(Exception):
    """A call the ledger refused or could not answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class LedgerUnreachable(LedgerCallError):
    """Nothing answers at the ledger's address."""


class LedgerTokenRefused(LedgerCallError):
    """The ledger refused its bearer token."""


class ApiKeyRefused(LedgerCallError):
    """The admin key was missing, not a live key of this ledger, or not an admin key."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(code, message)
        self.reason = reason


class AdminRefused(LedgerCallError):
    """Bad input or a rule of the ledger; nothing was stored."""


@dataclass(frozen=True)
class AccountView:
    id: str
    deposit_address: str | None
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held

    @classmethod
    def from_pb(cls, message: admin_pb2.Account) -> AccountView:
        return cls(message.id, message.deposit_address or None, int(message.balance), int(message.held))


@dataclass(frozen=True)
class KeyView:
    id: str
    account_id: str
    name: str
    admin: bool
    requests_per_second: float | None
    tokens_per_minute: int | None
    created_at: str
    revoked_at: str | None

    @classmethod
    def from_pb(cls, message: admin_pb2.ApiKey) -> KeyView:
        return cls(message.id, message.account_id, message.name, message.admin,
                   message.requests_per_second if message.HasField("requests_per_second") else None,
                   message.tokens_per_minute if message.HasField("tokens_per_minute") else None,
                   message.created_at, message.revoked_at or None)


@dataclass(frozen=True)
class NewKeyView:
    key: KeyView
    presented: str = field(repr=False)  # the only time the whole key is outside the ledger


@dataclass(frozen=True)
class CreditView:
    entry_id: int
    created: bool
    account: AccountView


@dataclass(frozen=True)
class LocalKeyView:
    created: bool
    key_id: str
    account_id: str
    credit: int
    path: Path
    problem: str | None


@dataclass(frozen=True)
class BatchView:
    id: str
    state: str
    tx_hash: str | None
    payees: int
    total: int
    reason: str
    lines: tuple[tuple[str, int], ...]  # (address, amount), dry run only


@dataclass(frozen=True)
class SettleView:
    dry_run: bool
    threshold: int
    batches: tuple[BatchView, ...]


class AdminClient:
    """Calls of the Admin API on one channel; `api_key` is presented on every call."""

    def __init__(self, channel: grpc.Channel, target: str, token: str, api_key: str | None = None) -> None:
        self.target = target
        self._stub = admin_pb2_grpc.AdminStub(channel)
        self._metadata = bearer_metadata(token) + (((API_KEY_METADATA, api_key),) if api_key else ())

    # ---- accounts -------------------------------------------------------------------------
    def who_am_i(self) -> KeyView:
        return KeyView.from_pb(self._call("WhoAmI", admin_pb2.WhoAmIRequest()).key)

    def create_account(self, account_id: str, deposit_address: str | None = None) -> AccountView:
        reply = self._call("CreateAccount", admin_pb2.CreateAccountRequest(
            account_id=account_id, deposit_address=deposit_address or ""))
        return AccountView.from_pb(reply.account)

    def list_accounts(self) -> list[AccountView]:
        return [AccountView.from_pb(a) for a in self._call("ListAccounts", admin_pb2.ListAccountsRequest()).accounts]

    def get_account(self, account_id: str) -> AccountView:
        return AccountView.from_pb(self._call("GetAccount", admin_pb2.GetAccountRequest(account_id=account_id)).account)

    def credit(self, account_id: str, amount: int, ref: str) -> CreditView:
        reply = self._call("CreditAccount", admin_pb2.CreditAccountRequest(account_id=account_id, amount=str(amount),
                                                                         ref=ref))
        return CreditView(reply.entry_id, reply.created, AccountView.from_pb(reply.account))

    def share_adapter(self, adapter: str, account_id: str) -> list[str]:
        reply = self._call("ShareAdapter", admin_pb2.ShareAdapterRequest(adapter=adapter, account_id=account_id))
        return list(reply.account_ids)

    def unshare_adapter(self, adapter: str, account_id: str) -> list[str]:
        reply = self._call("UnshareAdapter", admin_pb2.UnshareAdapterRequest(adapter=adapter, account_id=account_id))
        return list(reply.account_ids)

    # ---- keys -----------------------------------------------------------------------------
    def create_key(self, account_id: str, *, name: str = "", admin: bool = False,
                   requests_per_second: float | None = None, tokens_per_minute: int | None = None) -> NewKeyView:
        if tokens_per_minute is not None and not 1 <= tokens_per_minute < 2**64:  # uint64 on the wire
            raise AdminRefused(grpc.StatusCode.INVALID_ARGUMENT, "tokens per minute must be >= 1 (and < 2**64)")
        reply = self._call("CreateApiKey", admin_pb2.CreateApiKeyRequest(
            account_id=account_id, name=name, admin=admin, requests_per_second=requests_per_second,
            tokens_per_minute=tokens_per_minute))
        return NewKeyView(KeyView.from_pb(reply.key), reply.presented)

    def list_keys(self, account_id: str | None = None) -> list[KeyView]:
        reply = self._call("ListApiKeys", admin_pb2.ListApiKeysRequest(account_id=account_id or ""))
        return [KeyView.from_pb(k) for k in reply.keys]

    def revoke_key(self, key_id: str) -> KeyView:
        return KeyView.from_pb(self._call("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id=key_id)).key)

    def bootstrap_local_key(self) -> LocalKeyView:
        reply = self._call("BootstrapLocalKey", admin_pb2.BootstrapLocalKeyRequest())
        return LocalKeyView(reply.created, reply.key_id, reply.account_id, int(reply.credit or 0), Path(reply.path),
                            reply.problem or None)

    # ---- settlement -----------------------------------------------------------------------
    def settle(self, *, dry_run: bool = False, threshold: int | None = None) -> SettleView:
        reply = self._call("Settle", admin_pb2.SettleRequest(
            dry_run=dry_run, threshold=str(threshold) if threshold is not None else ""), SETTLE_TIMEOUT_SECONDS)
        batches = tuple(BatchView(b.id, b.state, b.tx_hash or None, b.payees, int(b.total), b.reason,
                                  tuple((line.address, int(line.amount)) for line in b.lines)) for b in reply.batches)
        return SettleView(reply.dry_run, int(reply.threshold), batches)

    # ---- transport ------------------------------------------------------------------------
    def _call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT_SECONDS) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise call_error(error, self.target) from None


def call_error(error: grpc.RpcError, target: str) -> LedgerCallError:
    """The typed error of a failed call."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message = error.details() or code.name  # type: ignore[attr-defined]
    refused = dict(error.trailing_metadata() or ()).get(REFUSED_METADATA)  # type: ignore[attr-defined]
    if refused:
        return ApiKeyRefused(code, message, str(refused))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return LedgerUnreachable(code, f"the ledger service at {target} is not answering ({message})")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return LedgerTokenRefused(code, message)
    if code in REFUSED_CODES:
        return AdminRefused(code, message)
    return LedgerCallError(code, message)


@contextmanager
def admin_client(state_dir: Path, api_key: str | None = None, target: str | None = None) -> Iterator[AdminClient]:
    """An AdminClient on the configured ledger (GATEWAY_LEDGER_ADDRESS, else host:port) with the token of
    `state_dir` (or GATEWAY_LEDGER_TOKEN); LedgerTokenMissing/LedgerTokenInvalid when there is none."""
    target = target or LedgerClientConfig().target
    token = read_ledger_token(state_dir)
    with grpc.insecure_channel(target) as channel:
        yield AdminClient(channel, target, token, api_key)
