"""`gateway adapter train|register|list|show`: adapters in the store, with owner, price and lineage."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from attribution.adapter_method import COMBINED, VERBATIM
from gateway.adapter_lifecycle import (
    adapter_store,
    check_new_name,
    lineage_label,
    store_and_register,
    train_and_register,
)
from gateway.admin_access import require_admin_of
from gateway.cli_output import EXIT_INTERRUPTED, CommandError, emit, json_flag, progress
from gateway.config import GatewayConfig
from gateway.contributor_key import load_private_key
from gateway.ledger_access import open_registries
from registry.adapters import DEFAULT_PRICE_PER_1K_TOKENS, AdapterRecord, parse_price
from registry.contribution_content import address_of_key
from training.lora_training import TrainingInterrupted

ATTRIBUTION_CHOICES = {"combined": COMBINED, "verbatim": VERBATIM}  # --attribution: the method recorded


def _payload(record: AdapterRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**record.to_json(), **(extra or {})}


def _human(p: dict[str, Any]) -> str:
    lineage = ", ".join(p["lineage"]) or "none"
    return f"adapter '{p['adapter']}' at {p['uri']}\n  owner {p['owner']}, price {p['price_per_1k_tokens']} " \
           f"base units per 1k tokens, lineage: {lineage}"


def _owner(args: argparse.Namespace) -> str:
    if args.owner:
        return args.owner
    try:
        return address_of_key(load_private_key(None))
    except CommandError:
        raise CommandError("no owner: pass --owner ADDRESS (or set GATEWAY_CONTRIBUTOR_KEY)") from None


def cmd_train(config: GatewayConfig, args: argparse.Namespace) -> None:
    registries = open_registries(config)
    check_new_name(config, registries, args.adapter)
    price = parse_price(args.price_per_1k_tokens)
    owner = _owner(args)
    lineage = registries.adapters.resolve_lineage(args.datanet)
    stop = threading.Event()

    def on_interrupt(_signum: int, _frame: object) -> None:
        stop.set()
        progress("\n[train] stopping after this step")

    labels = ", ".join(lineage_label(registries, v) for v in lineage)

    def report(update: Any) -> None:
        if update.step == 0:
            progress(f"[train] '{args.adapter}' on {labels}: {update.total_steps} steps (Ctrl-C stops safely)")
        elif update.step == 1 or update.step % 10 == 0 or update.step == update.total_steps:
            progress(f"[train] step {update.step}/{update.total_steps} loss {update.loss:.4f} "
                     f"({update.elapsed_seconds:.0f} s)")

    def report_features(done: int, total: int) -> None:
        if done == 1 or done % 10 == 0 or done == total:
            progress(f"[train] influence features {done}/{total} sequences")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        trained = train_and_register(config, registries, args.adapter, lineage, owner=owner, price=price,
                                     steps=args.steps, progress=report, should_stop=stop.is_set,
                                     attribution=ATTRIBUTION_CHOICES[args.attribution],
                                     features_progress=report_features)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except TrainingInterrupted:
        raise CommandError("training interrupted: nothing was written or registered", EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    emit(args, _payload(trained.record, {"steps": trained.steps, "final_loss": round(trained.final_loss, 4),
                                         "seconds": round(trained.seconds, 1),
                                         "attribution": ATTRIBUTION_CHOICES[args.attribution]}), _human)


def cmd_register(config: GatewayConfig, args: argparse.Namespace) -> None:
    require_admin_of(config)
    registries = open_registries(config)
    check_new_name(config, registries, args.adapter)
    price = parse_price(args.price_per_1k_tokens)
    lineage = registries.adapters.resolve_lineage(args.datanet)
    if not args.path.is_dir():
        raise CommandError(f"{args.path} is not a directory")
    record = store_and_register(config, registries, args.adapter, args.path, owner=args.owner, price=price,
                                 lineage=lineage, source="registered")
    emit(args, _payload(record), _human)


def cmd_list(config: GatewayConfig, args: argparse.Namespace) -> None:
    records = {r.name: _payload(r, {"registered": True}) for r in open_registries(config).adapters.list()}
    for name in adapter_store(config).names():
        records.setdefault(name, {"adapter": name, "uri": f"{config.store_url}/{name}", "owner": None,
                                  "price_per_1k_tokens": None, "lineage": [], "registered": False})
    adapters = [records[name] for name in sorted(records)]
    emit(args, {"adapters": adapters}, lambda p: "\n".join(
        f"{a['adapter']:28} {'lineage ' + ','.join(a['lineage']) if a['lineage'] else 'no lineage'}"
        f"{'' if a['registered'] else '  (in the store, not registered)'}" for a in p["adapters"]) or "no adapters")


def cmd_show(config: GatewayConfig, args: argparse.Namespace) -> None:
    record = open_registries(config).adapters.get(args.adapter)
    emit(args, _payload(record, {"servable": adapter_store(config).has(args.adapter)}), _human)


def add_parser(commands: argparse._SubParsersAction) -> None:
    adapter = commands.add_parser("adapter", help="LoRA adapters: train, register, list, show")
    sub = adapter.add_subparsers(dest="adapter_command", required=True)

    def money(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--price-per-1k-tokens", default=str(DEFAULT_PRICE_PER_1K_TOKENS),
                            help=f"integer base units of the payout token (default {DEFAULT_PRICE_PER_1K_TOKENS})")

    train = sub.add_parser("train", help="fine-tune a LoRA adapter on datanet versions and register it")
    train.add_argument("adapter")
    train.add_argument("--datanet", action="append", required=True, metavar="NAME[@VERSION]",
                       help="datanet version to learn from (repeatable; latest version when none is given)")
    train.add_argument("--owner", help="owner address (default: the address of GATEWAY_CONTRIBUTOR_KEY)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: enough to memorize a small datanet)")
    train.add_argument("--attribution", choices=sorted(ATTRIBUTION_CHOICES), default="combined",
                       help="how its responses are attributed: combined (verbatim spans, gradient influence "
                            "elsewhere; computes influence features after training) or verbatim (default combined)")
    money(train)
    json_flag(train)
    train.set_defaults(func=cmd_train)

    register = sub.add_parser("register", help="register an adapter trained elsewhere")
    register.add_argument("adapter")
    register.add_argument("--path", type=Path, required=True, help="PEFT LoRA directory")
    register.add_argument("--datanet", action="append", default=[], metavar="NAME@VERSION",
                          help="datanet version it learned from (repeatable)")
    register.add_argument("--owner", required=True, help="owner address")
    money(register)
    json_flag(register)
    register.set_defaults(func=cmd_register)

    listing = sub.add_parser("list", help="adapters in the store and their lineage")
    json_flag(listing)
    listing.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one registered adapter")
    show.add_argument("adapter")
    json_flag(show)
    show.set_defaults(func=cmd_show)
