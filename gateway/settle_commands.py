"""`gateway settle` (one settlement round to the end, run by the ledger) and `gateway chain info` (addresses in use).

The ledger service runs the round (`Admin.Settle`) with its own settings (GATEWAY_SETTLE_*, the chain
and operator key of GATEWAY_CHAIN_*), as its periodic settler does; this command asks for it with an
admin key and prints what the ledger answers. It opens no database.
"""

from __future__ import annotations

import argparse
from typing import Any

from gateway.admin_access import ledger_admin
from gateway.cli_output import emit, json_flag, progress
from gateway.config import GatewayConfig
from gateway.ledger_access import registry_contract, settlement_chain
from ledger.client.admin import BatchView


def _threshold(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer number of base units")
    return int(text)


def _batch_json(batch: BatchView) -> dict[str, Any]:
    return {"id": batch.id, "state": batch.state, "tx_hash": batch.tx_hash, "payees": batch.payees,
            "total": str(batch.total), **({"reason": batch.reason} if batch.reason else {})}


def cmd_settle(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        if not args.dry_run:
            progress(f"[settle] the ledger at {ledger.target} runs a settlement round until its batches are paid "
                     "(its log shows the steps)")
        result = ledger.settle(dry_run=args.dry_run, threshold=args.threshold)
    if args.dry_run:
        payload: dict[str, Any] = {"dry_run": True, "threshold": str(result.threshold), "batches": [
            {"payees": b.payees, "total": str(b.total),
             "lines": [{"address": address, "amount": str(amount)} for address, amount in b.lines]}
            for b in result.batches]}
        emit(args, payload, lambda p: "\n".join(
            [f"would pay {sum(b['payees'] for b in p['batches'])} addresses in {len(p['batches'])} batches "
             f"(threshold {p['threshold']} base units)"]
            + [f"  batch {i + 1}: {b['payees']} payees, {b['total']} base units" for i, b in enumerate(p["batches"])]))
        return
    payload = {"batches": [_batch_json(batch) for batch in result.batches]}
    emit(args, payload, lambda p: "\n".join(
        [f"{b['id']}  {b['state']:<9} {b['payees']:>4} payees {b['total']:>28}  {b['tx_hash'] or '-'}"
         for b in p["batches"]] or ["nothing to pay (no payable balance at or above the threshold)"]))


def cmd_chain_info(config: GatewayConfig, args: argparse.Namespace) -> None:
    with registry_contract(config) as registry, settlement_chain(config) as chain:
        payload = {"rpc_url": chain.client.rpc_url, "chain_id": chain.chain_id, "token": chain.settler.token_address,
                   "settler": chain.settler_address, "registry": registry.address, "operator": chain.operator}
    emit(args, payload, lambda p: "\n".join(f"{k}: {v}" for k, v in p.items())
         + f"\n(recorded in {config.layout.chain_deployment} for the local chain)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    settle = commands.add_parser("settle", help="have the ledger pay payable balances on-chain: one settlement round "
                                 "to the end")
    settle.add_argument("--dry-run", action="store_true", help="print the batches that would be paid; change nothing")
    settle.add_argument("--threshold", type=_threshold, help="pay balances at or above this many base units (default: "
                        "the ledger's GATEWAY_SETTLE_THRESHOLD)")
    json_flag(settle)
    settle.set_defaults(func=cmd_settle)

    chain = commands.add_parser("chain", help="the chain and contracts in use")
    sub = chain.add_subparsers(dest="chain_command", required=True)
    info = sub.add_parser("info", help="RPC URL, chain id and the token, settler and registry addresses")
    json_flag(info)
    info.set_defaults(func=cmd_chain_info)
