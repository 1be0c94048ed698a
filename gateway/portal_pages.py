"""The contributor portal of this node: what it is told about the chain, and its start and stop.

`gateway up` serves it beside the API (GATEWAY_PORTAL_*, 127.0.0.1:8080 by default); `gateway portal`
serves it alone against a running ledger. The chain addresses the browser checks against come from the
deployment record of the state directory, read again for each page (the payout contracts appear there
when the first settlement deploys them); the chain URL the browser uses is the local anvil's, or
GATEWAY_PORTAL_CHAIN_RPC_URL (the operator's RPC URL is never shown: it may hold a secret).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gateway.config import GatewayConfig
from ledger.chain.config import ChainConfig
from ledger.chain.registry import DEPLOYMENT_KEY, read_deployment
from ledger.chain.settlement import SETTLER_KEY, TOKEN_KEY
from ledger.config import SettlementConfig
from portal.app import ChainView
from portal.config import PortalConfig
from portal.server import PortalServer, open_services, serve_portal
from serving.metrics_endpoint import WILDCARD_HOSTS
from storage.database import database_url


def chain_view(config: GatewayConfig, portal: PortalConfig,
               chain: ChainConfig | None = None) -> Callable[[], ChainView]:
    """What each page tells the browser about the chain."""
    chain = chain or ChainConfig()
    settle = SettlementConfig()
    rpc_url = portal.chain_rpc_url or (f"http://127.0.0.1:{chain.port}" if chain.uses_local_node else "")

    def view() -> ChainView:
        record = read_deployment(config.layout.chain_deployment)
        return ChainView(rpc_url=rpc_url, chain_id=int(record.get("chain_id", chain.chain_id)),
                         registry=record.get(DEPLOYMENT_KEY), settler=settle.settler or record.get(SETTLER_KEY),
                         token=settle.token or record.get(TOKEN_KEY))

    return view


def start_portal(config: GatewayConfig, portal: PortalConfig | None = None) -> PortalServer:
    """Serve the portal of this state directory (OSError when its port cannot be bound)."""
    portal = portal or PortalConfig()
    services = open_services(
        portal, database_url=database_url(config.state_dir), state_dir=config.state_dir,
        model_dir=config.model_path, chain=chain_view(config, portal),
        api_url=portal.api_url or f"http://{'127.0.0.1' if config.host in WILDCARD_HOSTS else config.host}:"
                                  f"{config.http_port}",
    )
    return serve_portal(services)


@contextmanager
def portal_pages(config: GatewayConfig) -> Iterator[None]:
    """The portal for the length of the block, unless GATEWAY_PORTAL_ENABLED is false."""
    portal = PortalConfig()
    if not portal.enabled:
        yield
        return
    try:
        server = start_portal(config, portal)
    except OSError as error:
        print(f"[gateway] the portal is not served: {error} (set GATEWAY_PORTAL_PORT)", flush=True)
        yield
        return
    print(f"[gateway] contributor portal at {server.url}/datanets", flush=True)
    try:
        yield
    finally:
        server.stop()
