"""An in-process chain (eth-tester with py-evm) and clients for its first accounts, for fast contract tests."""

from __future__ import annotations

from eth_tester import EthereumTester
from web3 import Web3
from web3.providers.eth_tester import EthereumTesterProvider

from ledger.chain.client import ChainClient


def in_process_chain(count: int = 2) -> tuple[EthereumTester, list[ChainClient]]:
    """A fresh chain and one ChainClient per funded test account (the first is the operator)."""
    tester = EthereumTester()
    w3 = Web3(EthereumTesterProvider(tester))
    keys = [key.to_hex() for key in tester.backend.account_keys[:count]]
    return tester, [ChainClient.from_web3(w3, key) for key in keys]
