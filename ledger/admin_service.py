"""The ledger's Admin API (`gateway.ledger.v1.Admin`): the only writer of accounts, credits, private
adapters, API keys, the local admin key and settlement rounds, for operators (`gateway accounts|keys|settle`).

Thin over `Accounts`, `ApiKeys` and `Settler`: converts messages, checks the caller's admin key, maps
errors to status codes. Every call already passed the ledger's bearer token (ledger/service.py);
every call but GetAccount and BootstrapLocalKey also needs an admin API key in the metadata
`x-api-key`, verified here against the ledger's own keys, whatever else the database holds: a
ledger with no live admin key refuses every admin call (the way back is BootstrapLocalKey).

The local admin key is tied to the ledger's state directory: `create_local_key` reserves
`<state>/local-api-key` (O_EXCL, 0600) before it creates anything, and writes the key only there,
so the key never travels on the wire and an existing file is never replaced. The last live admin
key cannot be revoked (`LastAdminKey`). Bad input stores nothing: each write is one call of the
domain class, which checks before it writes.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from ledger.accounts.accounts import Accounts, CreditConflict, UnknownAccount, check_account_id
from ledger.accounts.api_keys import ApiKeys, LastAdminKey
from ledger.chain.errors import ChainConfigError, ChainError
from ledger.chain.settlement_chain import SettlementChain
from ledger.client.admin import API_KEY_METADATA, REFUSED_METADATA
from ledger.config import SettlementConfig
from ledger.models import ApiKey, RequesterAccount
from ledger.settlement.payouts import PayoutPolicy, PlannedLine, payable_balances
from ledger.settlement.settler import BatchView, Settler, SettlerConfig
from registry.contribution_content import checksum_address
from registry.models import Adapter
from wire.ledger.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
LOCAL_ACCOUNT = "local"
LOCAL_CREDIT_REF = "local-first-start"
LOCAL_KEY_NAME = "local admin key"
ROUND_TIMEOUT_SECONDS = 600.0
_KEY_FILE_WRITE_SECONDS = 2.0  # another call reserved the file a moment ago and is writing it

ChainFactory = Callable[[], AbstractContextManager[SettlementChain]]
"""Opens the operator's view of the PayoutSettler on the configured chain (for one round)."""


# ---- the local admin key ------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalKey:
    """The local admin key just created (the only object that holds its whole value, briefly)."""

    path: Path
    key_id: str
    credit: int
    presented: str = field(repr=False)


def create_local_key(engine: Engine, path: Path, credit: int) -> LocalKey:
    """Account `local` (credited `credit` once), an admin key for it, written to `path` (owner-only).

    The file is reserved first (O_EXCL, 0600), so an existing one is never replaced and two calls
    never both create a key: FileExistsError then, with nothing created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        out = os.fdopen(descriptor, "w", encoding="ascii")
    except BaseException:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    try:
        with out:
            accounts = Accounts(engine)
            try:
                accounts.get(LOCAL_ACCOUNT)
            except UnknownAccount:
                accounts.create(LOCAL_ACCOUNT)
            if credit:
                accounts.credit(LOCAL_ACCOUNT, credit, LOCAL_CREDIT_REF)
            new = ApiKeys(engine).create(LOCAL_ACCOUNT, name=LOCAL_KEY_NAME, admin=True)
            out.write(new.presented + "\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return LocalKey(path, new.key.id, credit, new.presented)


def local_key_problem(engine: Engine, path: Path) -> str | None:
    """Why the key in `path` cannot administer this ledger, or None when it can."""
    deadline = time.monotonic() + _KEY_FILE_WRITE_SECONDS
    while not (presented := path.read_text(encoding="ascii", errors="replace").strip()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    key = ApiKeys(engine).verify(presented)
    if key is None:
        return (f"the key in {path} is not a live key of this ledger (revoked, or made for another database); "
                f"remove the file and run `gateway keys bootstrap` to create a new local admin key")
    if not key.admin:
        return f"the key in {path} ({key.id}) is not an admin key"
    return None


# ---- settlement rounds --------------------------------------------------------------------------
@dataclass(frozen=True)
class Settlement:
    """Settlement rounds on the ledger's database and chain, with the ledger's GATEWAY_SETTLE_ settings."""

    engine: Engine
    chain: ChainFactory
    settings: SettlementConfig
    report: Callable[[str], None] = lambda _line: None

    def policy(self, threshold: int | None = None) -> PayoutPolicy:
        return PayoutPolicy(threshold or self.settings.threshold, self.settings.max_payees)

    def plan(self, threshold: int | None = None) -> list[list[PlannedLine]]:
        """The batches a round would pay now (nothing stored, no chain needed)."""
        policy = self.policy(threshold)
        with Session(self.engine) as session:
            lines = payable_balances(session, policy.threshold)
        return [lines[i:i + policy.max_payees] for i in range(0, len(lines), policy.max_payees)]

    def run_round(self, threshold: int | None = None, *, timeout_seconds: float = ROUND_TIMEOUT_SECONDS,
                  pausable: bool = False) -> list[BatchView]:
        """One round to the end (or `timeout_seconds`); `pausable` applies the GATEWAY_SETTLE_PAUSE_AFTER test hook."""
        settings = self.settings
        config = SettlerConfig(confirmations=settings.confirmations, stuck_after_seconds=settings.stuck_after_seconds,
                               fee_bump_percent=settings.fee_bump_percent,
                               pause_after=settings.pause_after if pausable else None)
        with self.chain() as chain:
            return Settler(self.engine, chain, self.policy(threshold), config, report=self.report).run_round(
                timeout_seconds)


# ---- the servicer -------------------------------------------------------------------------------
class _Refused(Exception):
    """A call answered with `code` and `message` (and the admin check's trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, message: str, refused: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.refused = code, message, refused


Method = TypeVar("Method", bound=Callable[..., Any])


def _rpc(*, admin: bool = True) -> Callable[[Method], Method]:
    """An RPC method: the admin check first (`admin`), then the call; errors become status codes."""

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def call(self: AdminServicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                key = self._admin_key(context) if admin else None
                return method(self, request, key)
            except _Refused as refused:
                if refused.refused:
                    context.set_trailing_metadata(((REFUSED_METADATA, refused.refused),))
                context.abort(refused.code, refused.message)
            except UnknownAccount as error:
                context.abort(grpc.StatusCode.NOT_FOUND, str(error))
            except (CreditConflict, LastAdminKey) as error:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
            except ValueError as error:  # the domain classes check input before they write
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            except ChainConfigError as error:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
            except ChainError as error:
                context.abort(grpc.StatusCode.ABORTED, f"{error} (unfinished batches are resumed by the next round)")
            except SQLAlchemyError as error:
                log.exception("ledger database error in Admin.%s", method.__name__)
                context.abort(grpc.StatusCode.INTERNAL, f"ledger database error: {type(error).__name__}")

        return call  # type: ignore[return-value]

    return decorate


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Thin over `Accounts`, `ApiKeys`, `create_local_key` and `Settlement`."""

    def __init__(self, engine: Engine, *, local_key_path: Path, local_credit: int, settlement: Settlement) -> None:
        self.engine = engine
        self.accounts = Accounts(engine)
        self.keys = ApiKeys(engine)
        self.local_key_path = local_key_path
        self.local_credit = local_credit
        self.settlement = settlement

    def _admin_key(self, context: grpc.ServicerContext) -> ApiKey:
        presented = str(dict(context.invocation_metadata()).get(API_KEY_METADATA, "")).strip()
        if not presented:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, f"this call needs an admin API key (metadata "
                           f"{API_KEY_METADATA})", "missing")
        key = self.keys.verify(presented)
        if key is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "the API key presented is not a live key of this ledger "
                           "(revoked, mistyped, or made for another database)", "not_live")
        if not key.admin:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"key {key.id} is not an admin key; use one created "
                           "with `gateway keys create --admin`", "not_admin")
        return key

    # ---- accounts -------------------------------------------------------------------------
    @_rpc()
    def WhoAmI(self, request: admin_pb2.WhoAmIRequest, key: ApiKey) -> admin_pb2.WhoAmIReply:  # noqa: N802
        return admin_pb2.WhoAmIReply(key=_key_pb(key))

    @_rpc()
    def CreateAccount(self, request: admin_pb2.CreateAccountRequest,  # noqa: N802
                      key: ApiKey) -> admin_pb2.CreateAccountReply:
        account_id = check_account_id(request.account_id)
        address = checksum_address(request.deposit_address) if request.deposit_address else None
        with Session(self.engine) as session:
            if session.get(RequesterAccount, account_id) is not None:
                raise _Refused(grpc.StatusCode.ALREADY_EXISTS, f"account {account_id!r} exists already")
            if address and session.exec(select(RequesterAccount.id).where(
                    RequesterAccount.deposit_address == address)).first() is not None:
                raise _Refused(grpc.StatusCode.ALREADY_EXISTS, f"deposit address {address} belongs to another account")
        account = self.accounts.create(account_id, address)
        log.info("account %s created by %s", account.id, key.id)
        return admin_pb2.CreateAccountReply(account=_account_pb(account))

    @_rpc()
    def ListAccounts(self, request: admin_pb2.ListAccountsRequest,  # noqa: N802
                     key: ApiKey) -> admin_pb2.ListAccountsReply:
        return admin_pb2.ListAccountsReply(accounts=[_account_pb(a) for a in self.accounts.list()])

    @_rpc(admin=False)
    def GetAccount(self, request: admin_pb2.GetAccountRequest, key: None) -> admin_pb2.GetAccountReply:  # noqa: N802
        return admin_pb2.GetAccountReply(account=_account_pb(self.accounts.get(request.account_id)))

    @_rpc()
    def CreditAccount(self, request: admin_pb2.CreditAccountRequest,  # noqa: N802
                      key: ApiKey) -> admin_pb2.CreditAccountReply:
        amount = _positive(request.amount, "amount")
        credited = self.accounts.credit(request.account_id, amount, request.ref)
        if credited.created:
            log.info("account %s credited %d (ref %r, entry %d) by %s", request.account_id, amount, request.ref,
                     credited.entry_id, key.id)
        return admin_pb2.CreditAccountReply(entry_id=credited.entry_id, created=credited.created,
                                            account=_account_pb(self.accounts.get(request.account_id)))

    @_rpc()
    def ShareAdapter(self, request: admin_pb2.ShareAdapterRequest,  # noqa: N802
                     key: ApiKey) -> admin_pb2.ShareAdapterReply:
        self._known_adapter(request.adapter)
        shared = self.accounts.share_adapter(request.adapter, request.account_id)
        log.info("adapter %s shared with %s by %s", request.adapter, request.account_id, key.id)
        return admin_pb2.ShareAdapterReply(adapter=request.adapter, account_ids=shared)

    @_rpc()
    def UnshareAdapter(self, request: admin_pb2.UnshareAdapterRequest,  # noqa: N802
                       key: ApiKey) -> admin_pb2.UnshareAdapterReply:
        self._known_adapter(request.adapter)
        self.accounts.get(request.account_id)  # UnknownAccount: NOT_FOUND
        shared = self.accounts.unshare_adapter(request.adapter, request.account_id)
        log.info("adapter %s unshared from %s by %s", request.adapter, request.account_id, key.id)
        return admin_pb2.UnshareAdapterReply(adapter=request.adapter, account_ids=shared)

    def _known_adapter(self, name: str) -> None:
        with Session(self.engine) as session:
            if session.get(Adapter, name) is None:
                raise _Refused(grpc.StatusCode.NOT_FOUND, f"no registered adapter {name!r}")

    # ---- keys -----------------------------------------------------------------------------
    @_rpc()
    def CreateApiKey(self, request: admin_pb2.CreateApiKeyRequest,  # noqa: N802
                     key: ApiKey) -> admin_pb2.CreateApiKeyReply:
        self.accounts.get(request.account_id)  # UnknownAccount: NOT_FOUND
        new = self.keys.create(
            request.account_id, name=request.name, admin=request.admin,
            requests_per_second=request.requests_per_second if request.HasField("requests_per_second") else None,
            tokens_per_minute=request.tokens_per_minute if request.HasField("tokens_per_minute") else None)
        log.info("%skey %s for account %s created by %s", "admin " if new.key.admin else "", new.key.id,
                 new.key.account_id, key.id)
        return admin_pb2.CreateApiKeyReply(key=_key_pb(new.key), presented=new.presented)

    @_rpc()
    def ListApiKeys(self, request: admin_pb2.ListApiKeysRequest,  # noqa: N802
                    key: ApiKey) -> admin_pb2.ListApiKeysReply:
        return admin_pb2.ListApiKeysReply(keys=[_key_pb(k) for k in self.keys.list(request.account_id or None)])

    @_rpc()
    def RevokeApiKey(self, request: admin_pb2.RevokeApiKeyRequest,  # noqa: N802
                     key: ApiKey) -> admin_pb2.RevokeApiKeyReply:
        if self.keys.get(request.key_id) is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"no API key {request.key_id!r}")
        revoked = self.keys.revoke(request.key_id)
        log.info("key %s revoked by %s", revoked.id, key.id)
        return admin_pb2.RevokeApiKeyReply(key=_key_pb(revoked))

    @_rpc(admin=False)
    def BootstrapLocalKey(self, request: admin_pb2.BootstrapLocalKeyRequest,  # noqa: N802
                          key: None) -> admin_pb2.BootstrapLocalKeyReply:
        path = self.local_key_path
        try:
            created = create_local_key(self.engine, path, self.local_credit)
        except FileExistsError:
            return admin_pb2.BootstrapLocalKeyReply(created=False, account_id=LOCAL_ACCOUNT, credit="0", path=str(path),
                                                    problem=local_key_problem(self.engine, path) or "")
        log.info("local admin key %s created, saved to %s", created.key_id, path)
        return admin_pb2.BootstrapLocalKeyReply(created=True, key_id=created.key_id, account_id=LOCAL_ACCOUNT,
                                                credit=str(created.credit), path=str(path))

    # ---- settlement -----------------------------------------------------------------------
    @_rpc()
    def Settle(self, request: admin_pb2.SettleRequest, key: ApiKey) -> admin_pb2.SettleReply:  # noqa: N802
        threshold = _positive(request.threshold, "threshold") if request.threshold else None
        policy = self.settlement.policy(threshold)
        if request.dry_run:
            batches = [admin_pb2.PayoutBatch(payees=len(lines), total=str(sum(line.amount for line in lines)),
                                             lines=[admin_pb2.PayoutLine(address=line.address, amount=str(line.amount))
                                                    for line in lines])
                       for lines in self.settlement.plan(threshold)]
            return admin_pb2.SettleReply(dry_run=True, threshold=str(policy.threshold), batches=batches)
        log.info("settlement round asked by %s", key.id)
        views = self.settlement.run_round(threshold, pausable=True)
        return admin_pb2.SettleReply(dry_run=False, threshold=str(policy.threshold), batches=[
            admin_pb2.PayoutBatch(id=v.id, state=v.state, tx_hash=v.tx_hash or "", payees=v.payees, total=str(v.total),
                                  reason=v.reason) for v in views])


def admin_servicer(servicer: AdminServicer) -> Callable[[grpc.Server], str]:
    """`servicer` as `ledger.service.start_server` takes it: adds it to the server, returns its name."""

    def add(server: grpc.Server) -> str:
        admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
        return SERVICE_NAME

    return add


def _positive(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise ValueError(f"{name} {text!r} is not a positive integer number of base units")
    return int(text)


def _account_pb(account: RequesterAccount) -> admin_pb2.Account:
    return admin_pb2.Account(id=account.id, deposit_address=account.deposit_address or "", balance=str(account.balance),
                             held=str(account.held), available=str(account.balance - account.held))


def _key_pb(key: ApiKey) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(id=key.id, account_id=key.account_id, name=key.name, admin=key.admin,
                            requests_per_second=key.requests_per_second, tokens_per_minute=key.tokens_per_minute,
                            created_at=key.created_at.isoformat(),
                            revoked_at=key.revoked_at.isoformat() if key.revoked_at else "")
