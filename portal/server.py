"""Builds the portal's services and serves its pages with uvicorn in a thread of the calling process.

`gateway up` runs it beside the API (gateway/supervisor.py); `gateway portal` runs it alone against
an existing state directory and ledger. The portal opens the registry's database read-only in intent
(it never writes), reaches the ledger with the ledger token like any other client, and never holds a
chain key: the checks that matter run in the viewer's browser against the chain itself.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ledger.client.access import LedgerAccessClient
from ledger.client.config import LedgerClientConfig
from ledger.client.reads import LedgerReads
from portal.app import ChainView, PortalServices, build_portal
from portal.config import PortalConfig
from portal.playground import Playground
from portal.registry_view import RegistryView
from portal.sessions import SessionStore
from portal.sign_in import SignInDesk
from statedir.layout import StateLayout
from storage.database import open_database

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 30.0


def token_decoder(model_dir: Path):  # type: ignore[no-untyped-def]
    """Token ids → text with the base model's tokenizer (tokenizer.json), special tokens left out."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return decode


def open_services(config: PortalConfig, *, database_url: str, state_dir: Path, model_dir: Path,
                  chain: Callable[[], ChainView], api_url: str,
                  ledger: LedgerClientConfig | None = None) -> PortalServices:
    """Everything the pages read from: the registry database, the ledger's read and Access APIs, the tokenizer."""
    reads = LedgerReads.for_state_dir(state_dir, ledger)
    access = LedgerAccessClient.for_state_dir(state_dir, ledger)
    registry = RegistryView(open_database(database_url, migrate=False), page_size=config.page_size,
                            tree_dir=StateLayout(state_dir).merkle_cache)
    return PortalServices(
        config=config, registry=registry, ledger=reads, authenticate=access.authenticate,
        key_account=access.key_account, decode=token_decoder(model_dir), chain=chain,
        sessions=SessionStore(ttl_seconds=config.session_minutes * 60), playground=Playground(api_url),
    )


@dataclass
class PortalServer:
    """The portal's uvicorn server, running in a daemon thread until `stop()`."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_portal(services: PortalServices) -> PortalServer:
    """Serve the portal on the configured host and port (0: a free one); returns once it accepts connections.
    OSError when the address cannot be bound."""
    config = services.config
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the portal cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    origin = f"http://{config.host}:{port}"
    services.sign_in = SignInDesk(domain=f"{config.host}:{port}", uri=origin, chain_id=services.chain().chain_id)
    server = uvicorn.Server(uvicorn.Config(build_portal(services), log_level="warning", access_log=False,
                                           lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the caller owns the signals
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="portal", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        raise OSError(f"the portal did not start on {config.host}:{port}")
    threading.Thread(target=services.registry.warm, name="portal-warm", daemon=True).start()
    return PortalServer(server, thread, config.host, port)
