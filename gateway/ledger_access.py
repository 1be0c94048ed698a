"""How CLI commands and the supervisor reach the ledger database, the chain and the index builder.

The chain is `GATEWAY_CHAIN_RPC_URL` when set. Otherwise it is the local anvil of this state
directory: the one `gateway up` runs (found by its port answering), or one started for the length
of the command and stopped after (its state is saved in the state directory either way).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from attribution.index_builder import build_index
from gateway.config import GatewayConfig
from ledger.chain.anvil import AnvilNode
from ledger.chain.client import ChainClient
from ledger.chain.config import ChainConfig
from ledger.chain.errors import ChainConfigError
from ledger.chain.registry import ensure_registry
from ledger.chain.settlement import PayoutSettler, ensure_settlement
from ledger.chain.settlement_chain import SettlementChain
from ledger.config import SettlementConfig
from registry.adapters import AdapterRegistry
from registry.config import DatanetConfig
from registry.datanets import DatanetRegistry, IndexBuilder
from storage.database import database_url, open_database


@dataclass
class Registries:
    engine: Engine
    datanets: DatanetRegistry
    adapters: AdapterRegistry


def open_registries(config: GatewayConfig) -> Registries:
    engine = open_database(database_url(config.state_dir))
    datanets = DatanetRegistry(engine, DatanetConfig())
    return Registries(engine, datanets, AdapterRegistry(engine, datanets))


def index_builder(config: GatewayConfig, progress=None) -> IndexBuilder:  # type: ignore[no-untyped-def]
    def build(documents: Iterable[tuple[str, str]], out_dir: Path) -> object:
        return build_index(documents, config.model_path, out_dir, progress=progress)

    return build


def rpc_answers(url: str) -> bool:
    import httpx  # deferred: ~70 ms at every CLI start; only commands that reach the chain ask

    try:
        reply = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=2)
        return reply.status_code == 200 and "result" in reply.json()
    except (httpx.HTTPError, ValueError):
        return False


@contextmanager
def local_chain(config: GatewayConfig, chain: ChainConfig) -> Iterator[str]:
    """The RPC URL of the chain to use, starting this state directory's anvil if nothing answers."""
    if chain.rpc_url:
        yield chain.rpc_url
        return
    url = f"http://127.0.0.1:{chain.port}"
    if rpc_answers(url):
        yield url
        return
    with AnvilNode(config.state_dir, port=chain.port, chain_id=chain.chain_id) as node:
        yield node.rpc_url


@contextmanager
def registry_contract(config: GatewayConfig):  # type: ignore[no-untyped-def]
    """The DatanetRegistry contract on the configured chain (deployed on first use locally)."""
    chain = ChainConfig()
    with local_chain(config, chain) as url:
        client = ChainClient(url, chain.private_key(local=chain.rpc_url is None))
        yield ensure_registry(client, config.layout.chain_deployment)


@contextmanager
def settlement_chain(config: GatewayConfig):  # type: ignore[no-untyped-def]
    """The operator's view of the PayoutSettler (and its token) on the configured chain.

    Locally the token and the settler are deployed on first use (the settler funded with
    GATEWAY_SETTLE_LOCAL_FUNDING); on a remote chain GATEWAY_SETTLE_SETTLER names the contract.
    """
    chain = ChainConfig()
    settle = SettlementConfig()
    local = chain.rpc_url is None
    with local_chain(config, chain) as url:
        client = ChainClient(url, chain.private_key(local=local))
        if local:
            _token, settler = ensure_settlement(client, config.layout.chain_deployment, fund=settle.local_funding)
        elif settle.settler:
            settler = PayoutSettler(client, settle.settler)
        else:
            raise ChainConfigError("set GATEWAY_SETTLE_SETTLER to the PayoutSettler address on this chain")
        yield SettlementChain(client, settler, local=local)
