"""`gateway ledger serve|balance|statement|trace|totals`.

`serve` runs the ledger service in this process until Ctrl-C/SIGTERM: the Ledger and Admin APIs,
the periodic settler and the deposit watcher (gateway/ledger_process.py), the only writers of money
state. It owns the API token (`<state>/ledger-token`, generated at its first start, or
GATEWAY_LEDGER_TOKEN) and checks every setting it reads before it starts. The other commands
ask the running service over gRPC (GATEWAY_LEDGER_ADDRESS, default 127.0.0.1:50051) with that
token, read from the state directory or the environment. Amounts are integer
base units of the payout token, printed as decimal strings (they exceed what JSON numbers hold
exactly).
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url

from gateway.cli_output import EXIT_BAD_INPUT, EXIT_FAILED, CommandError, emit, json_flag, progress
from gateway.config import GatewayConfig
from gateway.ledger_process import admin_api, deposit_watching, periodic_settlement, settlement
from ledger.chain.config import ChainConfig
from ledger.client.token import (TOKEN_ENV, LedgerTokenInvalid, LedgerTokenMissing, bearer_metadata,
                                 read_ledger_token)
from ledger.client.trace_wire import trace_from_pb
from ledger.config import DepositConfig, LedgerConfig, SettlementConfig
from ledger.journal.journal import Journal
from ledger.metrics import SettlementCollector
from ledger.service import ensure_ledger_token, start_server
from serving.config import AccessConfig
from serving.metrics_endpoint import serve_metrics
from storage.database import database_url, open_database
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

RPC_TIMEOUT_SECONDS = 30.0


def cmd_serve(config: GatewayConfig, args: argparse.Namespace) -> None:
    ledger = LedgerConfig()
    settle, deposits = SettlementConfig(), DepositConfig()  # every setting checked before anything starts
    ChainConfig(), AccessConfig()
    host = args.host or ledger.host
    port = args.port or ledger.port
    try:
        token = ensure_ledger_token(config.state_dir)
    except (LedgerTokenInvalid, LedgerTokenMissing) as error:
        raise CommandError(str(error)) from None
    url = database_url(config.state_dir)
    progress(f"[ledger] database {_redacted(url)} (migrating to the newest schema if needed)")
    journal = Journal(open_database(url), ledger.fee_split())
    rounds = settlement(config, journal.engine, settle)
    server = start_server(journal, host, port, token=token, servicers=[admin_api(config, journal.engine, rounds)])
    metrics = None
    stopped = threading.Event()
    try:  # from here on a SIGTERM (KeyboardInterrupt) stops the server cleanly, also while starting
        source = (TOKEN_ENV if ledger.token_value() is not None else f"the file {ledger.token_file}"
                  if ledger.token_file is not None else f"the owner-only file {config.layout.ledger_token}")
        progress(f"[ledger] every call but health needs the API token of {source}; administration also an "
                 "admin API key")
        REGISTRY.register(SettlementCollector(journal))
        metrics = serve_metrics(host, ledger.metrics_port, state_dir=config.state_dir, target_name=f"ledger-{port}")
        policy = journal.policy
        progress(f"[ledger] listening on {host}:{port}; fee split contributors {policy.contributors_bps / 100:g}% "
                 f"/ adapter owner {policy.owner_bps / 100:g}% / treasury {policy.treasury_bps / 100:g}%; "
                 f"metrics at {metrics.url}; Ctrl-C stops")
        with periodic_settlement(rounds), deposit_watching(config, journal.engine, deposits):
            stopped.wait()
    except KeyboardInterrupt:
        progress("[ledger] stopping")
    finally:
        stopped.set()
        if metrics is not None:
            metrics.close()
        server.stop(grace=2.0).wait()
        journal.engine.dispose()
    progress("[ledger] stopped")


def _redacted(url: str) -> str:
    """A database URL without its password."""
    return make_url(url).render_as_string(hide_password=True)


def _call(config: GatewayConfig, method: str, request: Any) -> Any:
    ledger = LedgerConfig()
    try:
        metadata = bearer_metadata(read_ledger_token(config.state_dir))
    except (LedgerTokenMissing, LedgerTokenInvalid) as error:
        raise CommandError(f"{error} (asking the ledger at {ledger.target})") from None
    with grpc.insecure_channel(ledger.target) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        try:
            return getattr(stub, method)(request, timeout=RPC_TIMEOUT_SECONDS, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CommandError(f"the ledger service at {ledger.target} is not answering; start it with "
                                   "`gateway ledger serve` (or `make up`)", EXIT_FAILED) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise CommandError(f"the ledger at {ledger.target} refused the token ({error.details()}): use the "
                                   "state directory of that ledger, or set GATEWAY_LEDGER_TOKEN to its token") from None
            exit_code = EXIT_BAD_INPUT if code in (grpc.StatusCode.INVALID_ARGUMENT,
                                                   grpc.StatusCode.NOT_FOUND) else EXIT_FAILED
            raise CommandError(error.details() or code.name, exit_code) from None


def _balance_json(balance: ledger_pb2.Balance) -> dict[str, str]:
    return {"address": balance.subject, "payable": balance.payable, "pending": balance.pending, "paid": balance.paid}


def cmd_balance(config: GatewayConfig, args: argparse.Namespace) -> None:
    if args.address.startswith("0x") or args.address.startswith("0X"):
        request = ledger_pb2.GetBalanceRequest(address=args.address)
        payload: dict[str, Any] = _balance_json(_call(config, "GetBalance", request))
        emit(args, payload, lambda p: f"{p['address']}: payable {p['payable']}, pending {p['pending']}, "
                                      f"paid {p['paid']} (base units)")
        return
    balance = _call(config, "GetBalance", ledger_pb2.GetBalanceRequest(account=args.address))
    emit(args, {"account": balance.subject, "amount": balance.amount},
         lambda p: f"{p['account']}: {p['amount']} (base units)")


def cmd_statement(config: GatewayConfig, args: argparse.Namespace) -> None:
    if not 1 <= args.limit <= 10_000 or args.before < 0:
        raise CommandError("--limit must be in 1..10000 and --before a non-negative entry id")
    statement = _call(config, "GetStatement", ledger_pb2.GetStatementRequest(
        address=args.address, limit=args.limit, before_entry_id=args.before))
    lines = [{"entry_id": line.entry_id, "kind": line.kind, "ref": line.ref, "account": line.account,
              "role": line.role, "amount": line.amount, "created_at": line.created_at,
              **({"tx_hash": line.tx_hash or None, "traces": list(line.traces)} if line.kind.startswith("payout_")
                 else {})}
             for line in statement.lines]
    payload = {"address": statement.address, "balance": _balance_json(statement.balance), "lines": lines}

    def human(p: dict[str, Any]) -> str:
        rows = [f"{line['created_at'][:19]}  entry {line['entry_id']:>8}  {line['kind']:<14} {line['ref']:<40} "
                f"{line['role']:<13} {line['amount']:>30}"
                + (f"  tx {line['tx_hash'] or '(not mined)'}, {len(line['traces'])} traces" if "traces" in line else "")
                for line in p["lines"]]
        b = p["balance"]
        return "\n".join([f"{p['address']}: payable {b['payable']}, pending {b['pending']}, paid {b['paid']}",
                          *(rows or ["(no entries)"])])

    emit(args, payload, human)


def cmd_trace(config: GatewayConfig, args: argparse.Namespace) -> None:
    record = _call(config, "GetTrace", ledger_pb2.GetTraceRequest(trace_id=args.trace_id))
    entry = record.entry
    payload = {
        "trace": trace_from_pb(record.trace).to_dict(), "content_sha256": record.content_sha256, "fee": record.fee,
        "price_per_1k_tokens": record.price_per_1k_tokens, "received_at": record.received_at,
        "entry": {"id": entry.id, "kind": entry.kind, "ref": entry.ref, "created_at": entry.created_at,
                  "postings": [{"account": p.account, "role": p.role, "amount": p.amount} for p in entry.postings]},
    }

    def human(p: dict[str, Any]) -> str:
        trace = p["trace"]
        head = (f"trace {trace['trace_id']}: model {trace['model']}, {trace['prompt_tokens']} prompt + "
                f"{trace['completion_tokens']} completion tokens, fee {p['fee']} (price {p['price_per_1k_tokens']}"
                f" per 1k tokens), entry {p['entry']['id']}")
        return "\n".join([head, *(f"  {x['role']:<13} {x['account']:<52} {x['amount']:>30}"
                                  for x in p["entry"]["postings"])])

    emit(args, payload, human)


def cmd_totals(config: GatewayConfig, args: argparse.Namespace) -> None:
    totals = _call(config, "GetTotals", ledger_pb2.GetTotalsRequest())
    payload = MessageToDict(totals, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for field in ("traces", "entries", "postings", "conflicts", "completion_tokens", "attributed_tokens",
                  "unbalanced_entries"):
        payload[field] = int(payload[field])  # uint64 fields come out of MessageToDict as strings
    emit(args, payload, lambda p: "\n".join(f"{k}: {v}" for k, v in p.items()))


def add_parser(commands: argparse._SubParsersAction) -> None:
    ledger = commands.add_parser("ledger", help="the ledger: trace ingest service, balances, statements")
    sub = ledger.add_subparsers(dest="ledger_command", required=True)

    serve = sub.add_parser("serve", help="run the ledger's gRPC service until Ctrl-C")
    serve.add_argument("--host", help="address to bind (default GATEWAY_LEDGER_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default GATEWAY_LEDGER_PORT or 50051)")
    serve.set_defaults(func=cmd_serve)

    balance = sub.add_parser("balance", help="payable, pending and paid of an address (or one account by name)")
    balance.add_argument("address", metavar="ADDRESS", help="0x… address, or an account such as 'treasury'")
    json_flag(balance)
    balance.set_defaults(func=cmd_balance)

    statement = sub.add_parser("statement", help="journal lines of an address, newest first, with their traces")
    statement.add_argument("address", metavar="ADDRESS")
    statement.add_argument("--limit", type=int, default=100, help="most lines (default 100)")
    statement.add_argument("--before", type=int, default=0, metavar="ENTRY_ID", help="lines older than this entry")
    json_flag(statement)
    statement.set_defaults(func=cmd_statement)

    trace = sub.add_parser("trace", help="an ingested trace and its journal entry")
    trace.add_argument("trace_id", metavar="TRACE_ID")
    json_flag(trace)
    trace.set_defaults(func=cmd_trace)

    totals = sub.add_parser("totals", help="counts and sums over the whole journal, invariants checked")
    json_flag(totals)
    totals.set_defaults(func=cmd_totals)
