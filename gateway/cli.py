"""The `gateway` command: run the stack, manage datanets and adapters, query the ledger.

Output and exit conventions are in `gateway.cli_output`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from attribution.config import AttributionConfig
from gateway import (
    account_commands,
    adapter_commands,
    datanet_commands,
    ledger_commands,
    model_commands,
    portal_commands,
    settle_commands,
)
from gateway.cli_output import EXIT_BAD_INPUT, EXIT_FAILED, CommandError, fail
from gateway.config import GatewayConfig
from ledger.chain.errors import ChainConfigError, ChainError
from ledger.service import is_loopback
from registry.errors import AnchorFailed, RegistryError
from serving.config import EngineConfig, ReplicaConfig


def _config(args: argparse.Namespace) -> GatewayConfig:
    overrides = {}
    for field in ("state_dir", "http_port", "grpc_port", "host", "ray_address"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    return GatewayConfig(**overrides)


def cmd_up(config: GatewayConfig, args: argparse.Namespace) -> None:
    from gateway.supervisor import run  # deferred: only `up` and `demo` need the supervisor and what it imports

    if args.no_auth:
        if not is_loopback(config.host):
            raise CommandError(f"--no-auth is refused on {config.host}: without keys anyone who can reach the "
                               "gateway can spend; bind 127.0.0.1 or keep auth on")
        os.environ["GATEWAY_AUTH"] = "false"  # the replicas (Ray workers) read it too
    AttributionConfig()  # the replicas read GATEWAY_ATTRIBUTION_*: a bad value is refused here, before anything starts
    run(config, EngineConfig(), ReplicaConfig())


def cmd_demo(config: GatewayConfig, args: argparse.Namespace) -> None:
    from gateway.supervisor import ensure_demo_assets  # deferred: as in cmd_up

    ensure_demo_assets(config)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gateway", description="Datanet Gateway: attribution-native LLM serving.")
    root.add_argument("--state-dir", dest="state_dir", type=Path, help="state directory (default ./.gateway)")
    commands = root.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the whole stack and block until Ctrl-C")
    up.add_argument("--http-port", dest="http_port", type=int)
    up.add_argument("--grpc-port", dest="grpc_port", type=int)
    up.add_argument("--host")
    up.add_argument("--ray-address", dest="ray_address", metavar="HOST:PORT",
                    help="join this running Ray cluster (default: RAY_ADDRESS, else start a node-local one)")
    up.add_argument("--no-auth", dest="no_auth", action="store_true",
                    help="serve without API keys (local experiments only; refused off loopback)")
    up.set_defaults(func=cmd_up)

    demo = commands.add_parser("demo", help="build the demo base model and load-test adapters (cached)")
    demo.set_defaults(func=cmd_demo)

    datanet_commands.add_parser(commands)
    adapter_commands.add_parser(commands)
    ledger_commands.add_parser(commands)
    settle_commands.add_parser(commands)
    account_commands.add_parser(commands)
    model_commands.add_parser(commands)
    portal_commands.add_parser(commands)
    return root


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: child processes (anvil) are stopped
    serving = args.command in ("up", "demo") or getattr(args, "ledger_command", None) == "serve"
    level = logging.INFO if serving else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(_config(args), args)
    except CommandError as exc:
        return fail(str(exc), exc.exit_code)
    except ChainConfigError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except (AnchorFailed, ChainError) as exc:
        return fail(str(exc), EXIT_FAILED)
    except RegistryError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except ValidationError as exc:
        first = exc.errors()[0]
        return fail(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}", EXIT_BAD_INPUT)
    except SQLAlchemyError as exc:
        return fail(f"ledger database error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}", EXIT_FAILED)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except OSError as exc:
        return fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", EXIT_FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
