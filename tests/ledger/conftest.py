"""Chain fixtures: one real anvil node per test session (state in a temporary directory)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode
from ledger.chain.client import ChainClient


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
