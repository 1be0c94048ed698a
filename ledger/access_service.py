"""The ledger's gRPC Access service (`gateway.ledger.v1.Access`): messages in and out of `AccessDesk`.

Served on the ledger's port behind its token (ledger/service.py adds it to every ledger server).
It also runs the expiry of two-phase transfers: a thread that expires overdue leases and holds
every `expire_every_seconds` (ledger/accounts/transfers.py `Transfers.expire`), stopped with the server.
"""

from __future__ import annotations

import logging
import threading

import grpc
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ledger.accounts.access_desk import AccessDesk
from ledger.client.access import NoCredit, hold_from_pb
from wire.ledger.v1 import access_pb2, access_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = access_pb2.DESCRIPTOR.services_by_name["Access"].full_name
EXPIRE_EVERY_SECONDS = 30.0
MAX_HOLDS_PER_CALL = 10_000


def _results_pb(results: tuple) -> list[access_pb2.HoldResult]:  # type: ignore[type-arg]
    return [access_pb2.HoldResult(hold_id=r.hold_id, state=r.state, reason=r.reason) for r in results]


class AccessServicer(access_pb2_grpc.AccessServicer):
    def __init__(self, desk: AccessDesk) -> None:
        self.desk = desk

    def _holds(self, messages: object, context: grpc.ServicerContext) -> list:  # type: ignore[type-arg]
        items = list(messages)  # type: ignore[call-overload]
        if len(items) > MAX_HOLDS_PER_CALL:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_HOLDS_PER_CALL} holds per call")
        try:
            return [hold_from_pb(m) for m in items]
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid hold: {error}")
        raise AssertionError("unreachable")

    def Authenticate(self, request: access_pb2.AuthenticateRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> access_pb2.KeyGrant:
        key = self.desk.authenticate(request.presented)
        if key is None:
            return access_pb2.KeyGrant(found=False)
        reply = access_pb2.KeyGrant(found=True, key_id=key.key_id, account_id=key.account_id, admin=key.admin)
        if key.requests_per_second is not None:
            reply.requests_per_second = key.requests_per_second
        if key.tokens_per_minute is not None:
            reply.tokens_per_minute = key.tokens_per_minute
        return reply

    def GetKeyAccount(self, request: access_pb2.GetKeyAccountRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> access_pb2.KeyAccount:
        account = self.desk.key_account(request.key_id)
        return access_pb2.KeyAccount(found=account is not None, account_id=account or "")

    def GetTerms(self, request: access_pb2.GetTermsRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> access_pb2.Terms:
        return access_pb2.Terms(adapters=[
            access_pb2.AdapterTerms(name=name, price_per_1k_tokens=str(terms.price_per_1k_tokens),
                                    shared_with=sorted(terms.shared_with))
            for name, terms in sorted(self.desk.terms().items())])

    def GetLineage(self, request: access_pb2.GetLineageRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> access_pb2.Lineage:
        lineage = self.desk.lineage(request.adapter)
        return access_pb2.Lineage(index_dirs=list(lineage.index_dirs), index_digests=list(lineage.digests()), owners=[
            access_pb2.ContributionOwner(contribution_id=cid, contributor=owner, datanet=datanet)
            for cid, (owner, datanet) in lineage.owners.items()])

    def Lease(self, request: access_pb2.LeaseRequest,  # noqa: N802
              context: grpc.ServicerContext) -> access_pb2.LeaseGrant:
        try:
            amount = int(request.amount)
            grant = self.desk.lease(request.lease_id, request.account_id, amount, request.owner,
                                    ttl_seconds=request.ttl_seconds)
        except NoCredit as short:
            context.set_trailing_metadata((("available", str(short.available)),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(short))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except SQLAlchemyError as error:
            log.exception("ledger database error on a lease")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"ledger database error: {type(error).__name__}; retry")
        return access_pb2.LeaseGrant(lease_id=grant.lease_id, granted=str(grant.granted),
                                     available=str(grant.available))

    def ReturnLease(self, request: access_pb2.ReturnLeaseRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> access_pb2.LeaseState:
        holds = self._holds(request.holds, context)
        try:
            results = self.desk.return_lease(request.lease_id, holds)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        record = self.desk.transfers.get(request.lease_id)
        return access_pb2.LeaseState(lease_id=request.lease_id, state=record.state if record else "unknown",
                                     holds=_results_pb(results))

    def ReportHolds(self, request: access_pb2.ReportHoldsRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> access_pb2.ReportHoldsReply:
        holds = self._holds(request.holds, context)
        try:
            results = self.desk.report(holds)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except SQLAlchemyError as error:
            log.exception("ledger database error on a hold report")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"ledger database error: {type(error).__name__}; retry")
        return access_pb2.ReportHoldsReply(holds=_results_pb(results))

    def TakeRate(self, request: access_pb2.TakeRateRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> access_pb2.RateGrant:
        try:
            grant = self.desk.take_rate(
                request.key_id,
                request.requests_per_second if request.HasField("requests_per_second") else None,
                request.tokens_per_minute if request.HasField("tokens_per_minute") else None,
                request.requests, request.tokens, min_requests=request.min_requests, min_tokens=request.min_tokens)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return access_pb2.RateGrant(requests=grant.requests, tokens=grant.tokens,
                                    retry_after_seconds=grant.retry_after_seconds, reason=grant.reason)


class TransferExpiry:
    """Expires overdue leases and holds every `every_seconds` until `stop()`."""

    def __init__(self, desk: AccessDesk, every_seconds: float = EXPIRE_EVERY_SECONDS) -> None:
        self.desk = desk
        self.every_seconds = every_seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-expiry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.every_seconds):
            try:
                expired = self.desk.expire()
                if expired.leases or expired.holds:
                    log.info("expired %d leases and %d holds", expired.leases, expired.holds)
            except Exception:  # keep expiring: a database hiccup must not end it
                log.exception("could not expire transfers")

    def stop(self) -> None:
        self._stopped.set()


def add_access_service(server: grpc.Server, engine: Engine) -> TransferExpiry:
    """Add the Access service over `engine` to `server`; the expiry it starts (stop it with the server)."""
    desk = AccessDesk(engine)
    access_pb2_grpc.add_AccessServicer_to_server(AccessServicer(desk), server)
    return TransferExpiry(desk)
