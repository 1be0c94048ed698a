"""`gateway accounts create|list|balance|credit|share` and `gateway keys bootstrap|create|list|revoke`.

They ask the ledger service's Admin API (`gateway up` or `gateway ledger serve` must be running) and
open no database. Amounts are integer base units of the payout token, printed as strings in
`--json`. A key's secret is printed once, by `keys create`, and never again. All but `accounts
balance` and `keys bootstrap` present an admin key, which the ledger verifies
(gateway/admin_access.py); `keys bootstrap` has the ledger create the first one, the local admin key
in `<state>/local-api-key`, as `gateway up` does at its first start.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from gateway.admin_access import LOCAL_ACCOUNT, bootstrap_local_key, describe_new_local_key, ledger_admin
from gateway.cli_output import CommandError, emit, json_flag
from gateway.config import GatewayConfig
from ledger.client.admin import AccountView, KeyView


def _amount(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer number of base units")
    return int(text)


def _account_json(account: AccountView) -> dict[str, Any]:
    return {"id": account.id, "deposit_address": account.deposit_address, "balance": str(account.balance),
            "held": str(account.held), "available": str(account.available)}


def _key_json(key: KeyView) -> dict[str, Any]:
    return {"id": key.id, "account": key.account_id, "name": key.name, "admin": key.admin,
            "requests_per_second": key.requests_per_second, "tokens_per_minute": key.tokens_per_minute,
            "created_at": key.created_at, "revoked_at": key.revoked_at}


def cmd_account_create(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        account = ledger.create_account(args.account, args.deposit_address)
    emit(args, _account_json(account), lambda p: f"account {p['id']} created (balance 0)")


def cmd_account_list(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        accounts = [_account_json(a) for a in ledger.list_accounts()]
    emit(args, {"accounts": accounts}, lambda p: "\n".join(
        f"{a['id']}: available {a['available']} (balance {a['balance']}, held {a['held']})" for a in p["accounts"])
        or "no accounts")


def cmd_account_balance(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config, admin=False) as ledger:
        payload = _account_json(ledger.get_account(args.account))
    emit(args, payload, lambda p: f"{p['id']}: available {p['available']} (balance {p['balance']}, "
                                  f"held {p['held']}) base units")


def cmd_account_credit(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        credited = ledger.credit(args.account, args.amount, args.ref)
    payload = {**_account_json(credited.account), "entry_id": credited.entry_id, "created": credited.created}
    emit(args, payload, lambda p: (f"credited {args.amount} to {p['id']} (entry {p['entry_id']})" if p["created"]
                                   else f"{args.ref!r} was credited before (entry {p['entry_id']}); nothing changed")
         + f"; available {p['available']}")


def cmd_account_share(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        change = ledger.unshare_adapter if args.remove else ledger.share_adapter
        shared = change(args.adapter, args.account)
    emit(args, {"adapter": args.adapter, "private": bool(shared), "accounts": shared},
         lambda p: f"{p['adapter']}: private to {', '.join(p['accounts'])}" if p["private"]
         else f"{p['adapter']}: public (shared with no account)")


def cmd_key_create(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        new = ledger.create_key(args.account, name=args.name, admin=args.admin,
                                requests_per_second=args.requests_per_second,
                                tokens_per_minute=args.tokens_per_minute)
    payload = {**_key_json(new.key), "key": new.presented}
    emit(args, payload, lambda p: f"key {p['id']} for account {p['account']}:\n{p['key']}\n"
                                  "(shown once: store it now; only its hash is kept)")


def cmd_key_list(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        keys = [_key_json(k) for k in ledger.list_keys(args.account)]
    emit(args, {"keys": keys}, lambda p: "\n".join(
        f"{k['id']} account {k['account']}{' admin' if k['admin'] else ''}"
        f"{' REVOKED ' + k['revoked_at'] if k['revoked_at'] else ''} {k['name']}".rstrip() for k in p["keys"])
        or "no keys")


def cmd_key_bootstrap(config: GatewayConfig, args: argparse.Namespace) -> None:
    key = bootstrap_local_key(config)
    if not key.created:
        if key.problem is not None:
            raise CommandError(key.problem)
        emit(args, {"created": False, "account": LOCAL_ACCOUNT, "path": str(key.path)},
             lambda p: f"the local admin key is in {p['path']} (nothing created)")
        return
    payload = {"created": True, "id": key.key_id, "account": key.account_id, "credit": str(key.credit),
               "path": str(key.path)}  # never the key: the file holds it
    emit(args, payload, lambda _: describe_new_local_key(key, sys.stdout))


def cmd_key_revoke(config: GatewayConfig, args: argparse.Namespace) -> None:
    with ledger_admin(config) as ledger:
        key = ledger.revoke_key(args.key_id)
    emit(args, _key_json(key), lambda p: f"key {p['id']} revoked at {p['revoked_at']}")


def _command(group: argparse._SubParsersAction, name: str, help_text: str,
             func: Callable[[GatewayConfig, argparse.Namespace], None]) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text)
    json_flag(parser)
    parser.set_defaults(func=func)
    return parser


def add_parser(commands: argparse._SubParsersAction) -> None:
    accounts = commands.add_parser("accounts", help="requester accounts: prepaid balances that pay for inferences")
    group = accounts.add_subparsers(dest="accounts_command", required=True)
    create = _command(group, "create", "create an account with a zero balance", cmd_account_create)
    create.add_argument("account", help="id: 1-48 of a-z 0-9 . _ - (starting with a letter or digit)")
    create.add_argument("--deposit-address", help="chain address whose token transfers to the treasury credit it")
    _command(group, "list", "every account and its balance", cmd_account_list)
    balance = _command(group, "balance", "an account's balance, held and available amounts", cmd_account_balance)
    balance.add_argument("account")
    credit = _command(group, "credit", "credit an account once per reference (operator)", cmd_account_credit)
    credit.add_argument("account")
    credit.add_argument("amount", type=_amount, help="base units of the payout token")
    credit.add_argument("--ref", required=True, help="unique reference (invoice, payment id): a repeat is a no-op")

    share = _command(group, "share", "make an adapter private to accounts (others get 404; --remove undoes)",
                     cmd_account_share)
    share.add_argument("account")
    share.add_argument("adapter")
    share.add_argument("--remove", action="store_true", help="take the account off the adapter")

    keys = commands.add_parser("keys", help="API keys of requester accounts")
    group = keys.add_subparsers(dest="keys_command", required=True)
    _command(group, "bootstrap", "create the local admin key in <state>/local-api-key if it does not exist (as "
             "`gateway up` does at first start); no admin key needed", cmd_key_bootstrap)
    create = _command(group, "create", "create a key (printed once)", cmd_key_create)
    create.add_argument("--account", required=True)
    create.add_argument("--name", default="", help="a label for people")
    create.add_argument("--admin", action="store_true", help="may manage adapters, keys and settlement")
    create.add_argument("--requests-per-second", type=float, help="rate limit (default: the gateway's)")
    create.add_argument("--tokens-per-minute", type=int, help="rate limit (default: the gateway's)")
    listing = _command(group, "list", "keys (ids, never secrets)", cmd_key_list)
    listing.add_argument("--account")
    revoke = _command(group, "revoke", "revoke a key at once (never the last live admin key)", cmd_key_revoke)
    revoke.add_argument("key_id")
