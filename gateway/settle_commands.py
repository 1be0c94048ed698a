"""`gateway settle` (one settlement round to the end) and `gateway chain info` (the addresses in use)."""

from __future__ import annotations

import argparse
from typing import Any

from sqlmodel import Session

from gateway.admin_access import require_admin_of
from gateway.cli_output import emit, json_flag, progress
from gateway.config import GatewayConfig
from gateway.ledger_access import registry_contract, settlement_chain
from ledger.config import SettlementConfig
from ledger.settlement.payouts import PayoutPolicy, payable_balances
from ledger.settlement.settler import Settler, SettlerConfig
from storage.database import database_url, open_database


def cmd_settle(config: GatewayConfig, args: argparse.Namespace) -> None:
    require_admin_of(config)
    settle = SettlementConfig()
    policy = PayoutPolicy(settle.threshold, settle.max_payees)
    engine = open_database(database_url(config.state_dir))
    if args.dry_run:
        with Session(engine) as session:
            lines = payable_balances(session, policy.threshold)
        batches = [lines[i:i + policy.max_payees] for i in range(0, len(lines), policy.max_payees)]
        payload: dict[str, Any] = {"dry_run": True, "threshold": str(policy.threshold), "batches": [
            {"payees": len(batch), "total": str(sum(line.amount for line in batch)),
             "lines": [{"address": line.address, "amount": str(line.amount)} for line in batch]} for batch in batches]}
        emit(args, payload, lambda p: "\n".join([f"would pay {len(lines)} addresses in {len(batches)} batches "
                                                 f"(threshold {policy.threshold} base units)"]
                                                + [f"  batch {i + 1}: {b['payees']} payees, {b['total']} base units"
                                                   for i, b in enumerate(p["batches"])]))
        return
    settler_config = SettlerConfig(confirmations=settle.confirmations, stuck_after_seconds=settle.stuck_after_seconds,
                                   fee_bump_percent=settle.fee_bump_percent, pause_after=settle.pause_after)
    with settlement_chain(config) as chain:
        views = Settler(engine, chain, policy, settler_config, report=progress).run_round()
    payload = {"batches": [view.to_json() for view in views]}
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
    settle = commands.add_parser("settle", help="pay payable balances on-chain: one settlement round to the end")
    settle.add_argument("--dry-run", action="store_true", help="print the batches that would be paid; change nothing")
    json_flag(settle)
    settle.set_defaults(func=cmd_settle)

    chain = commands.add_parser("chain", help="the chain and contracts in use")
    sub = chain.add_subparsers(dest="chain_command", required=True)
    info = sub.add_parser("info", help="RPC URL, chain id and the token, settler and registry addresses")
    json_flag(info)
    info.set_defaults(func=cmd_chain_info)
