"""`gateway portal`: serve the contributor portal alone, against this state directory and a running ledger.

`gateway up` already serves it; this command is for a portal on its own machine or port (a read-only
replica of the pages), and for measuring it (loadtests/bench_portal.py).
"""

from __future__ import annotations

import argparse
import signal
import threading

from gateway.cli_output import EXIT_FAILED, CommandError
from gateway.config import GatewayConfig
from gateway.portal_pages import start_portal
from portal.config import PortalConfig


def cmd_portal(config: GatewayConfig, args: argparse.Namespace) -> None:
    overrides = {key: value for key, value in (("host", args.portal_host), ("port", args.portal_port))
                 if value is not None}
    try:
        server = start_portal(config, PortalConfig(**overrides))
    except OSError as error:
        raise CommandError(str(error), EXIT_FAILED) from None
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"[portal] ready: {server.url}/datanets; Ctrl-C stops", flush=True)
    stop.wait()
    server.stop()
    print("[portal] stopped", flush=True)


def add_parser(commands: argparse._SubParsersAction) -> None:
    portal = commands.add_parser("portal", help="serve the contributor portal alone (gateway up serves it too)")
    portal.add_argument("--host", dest="portal_host", help="interface to bind (default GATEWAY_PORTAL_HOST, 127.0.0.1)")
    portal.add_argument("--port", dest="portal_port", type=int, help="port (default GATEWAY_PORTAL_PORT, 8080; 0: "
                        "a free one)")
    portal.set_defaults(func=cmd_portal)
