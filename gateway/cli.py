"""The `gateway` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gateway.config import EngineConfig, GatewayConfig, ReplicaConfig


def _config(args: argparse.Namespace) -> GatewayConfig:
    overrides = {}
    for field in ("state_dir", "http_port", "grpc_port", "host"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    return GatewayConfig(**overrides)


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.supervisor import run

    run(_config(args), EngineConfig(), ReplicaConfig())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.supervisor import ensure_demo_assets

    ensure_demo_assets(_config(args))
    return 0


def cmd_adapter_register(args: argparse.Namespace) -> int:
    from serving.adapter_store import AdapterStore, BaseModelShape, check_adapter_dir
    from serving.errors import ApiError

    config = _config(args)
    source = Path(args.path)
    try:
        check_adapter_dir(source, BaseModelShape.from_model_dir(config.model_path), EngineConfig().max_lora_rank)
        AdapterStore(config.store_url, config.cache_dir).put(args.name, source)
    except ApiError as exc:
        print(f"gateway: cannot register '{args.name}': {exc.message}", file=sys.stderr)
        return 2
    print(f"registered adapter '{args.name}' in {config.store_url}")
    return 0


def cmd_adapter_list(args: argparse.Namespace) -> int:
    from serving.adapter_store import AdapterStore

    config = _config(args)
    names = AdapterStore(config.store_url, config.cache_dir).names()
    print(json.dumps(names, indent=2) if args.json else "\n".join(names))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gateway", description="Datanet Gateway: attribution-native LLM serving.")
    root.add_argument("--state-dir", dest="state_dir", type=Path, help="state directory (default ./.gateway)")
    commands = root.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the whole stack and block until Ctrl-C")
    up.add_argument("--http-port", dest="http_port", type=int)
    up.add_argument("--grpc-port", dest="grpc_port", type=int)
    up.add_argument("--host")
    up.set_defaults(func=cmd_up)

    demo = commands.add_parser("demo", help="build the demo base model and adapters (cached)")
    demo.set_defaults(func=cmd_demo)

    adapter = commands.add_parser("adapter", help="manage LoRA adapters in the adapter store")
    adapter_commands = adapter.add_subparsers(dest="adapter_command", required=True)
    register = adapter_commands.add_parser("register", help="add an adapter directory to the store")
    register.add_argument("name")
    register.add_argument("path")
    register.set_defaults(func=cmd_adapter_register)
    listing = adapter_commands.add_parser("list", help="list registered adapters")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_adapter_list)
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
