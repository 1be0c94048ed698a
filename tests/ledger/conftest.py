"""Ledger fixtures: one real anvil node per test session; a journal over a small registry on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from sqlalchemy import Engine

from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode
from ledger.chain.client import ChainClient
from ledger.journal.fee_split import FeeSplitPolicy
from ledger.journal.journal import Journal
from registry.adapters import AdapterRegistry
from registry.config import DatanetConfig
from registry.contribution_content import content_id, normalize
from registry.datanets import DatanetRegistry
from storage.database import open_database
from tests.registry.test_datanet_registry import ALICE, BOB, TEXTS, signed
from tests.support.memory_anchor import MemoryAnchor, listing_index
from tests.support.ports import free_port


def free_local_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def anvil_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilNode]:
    """A started anvil on a free port (automine), shared by the session; stopped cleanly at the end."""
    node = AnvilNode(tmp_path_factory.mktemp("anvil-state"), port=free_local_port())
    node.start()
    yield node
    assert node.stop() == 0, f"anvil did not exit cleanly; see {node.log_file}"


@pytest.fixture()
def anvil_client(anvil_node: AnvilNode) -> ChainClient:
    """The operator client (anvil dev key 0) on the session's anvil."""
    return ChainClient(anvil_node.rpc_url, ANVIL_DEV_KEYS[0])


OWNER = Account.from_key("0x" + "c3" * 32)
PRICE = 10**22  # base units per 1k tokens: every fee below exceeds 64 bits
CIDS = [content_id(normalize(text)) for text in TEXTS]


def rivers_ledger(url: str, work: Path) -> Engine:
    """A ledger with datanet 'rivers' v1 (Alice: 2 texts, Bob: 1) and adapter 'river-guide' (owner OWNER)."""
    engine = open_database(url)
    registry = DatanetRegistry(engine, DatanetConfig())
    datanet = registry.create("rivers")
    registry.contribute("rivers", [signed(ALICE, datanet.id, TEXTS[0]), signed(ALICE, datanet.id, TEXTS[1]),
                                   signed(BOB, datanet.id, TEXTS[2])])
    registry.publish("rivers", listing_index, MemoryAnchor(), work)
    adapters = AdapterRegistry(engine, registry)
    adapters.register("river-guide", uri="file:///x", base_model="tiny", owner=OWNER.address,
                      price_per_1k_tokens=PRICE, lineage=adapters.resolve_lineage(["rivers"]), source="trained")
    return engine


@pytest.fixture()
def journal(database_url: str, tmp_path: Path) -> Iterator[Journal]:
    """A ledger with datanet 'rivers' v1 (Alice: 2 texts, Bob: 1) and adapter 'river-guide' (owner OWNER)."""
    engine = rivers_ledger(database_url, tmp_path)
    yield Journal(engine, FeeSplitPolicy(contributors_bps=7000, owner_bps=2000))
    engine.dispose()  # close its connections now (PostgreSQL would warn when they are garbage-collected)
