"""What the settler needs from the chain, over web3 and the PayoutSettler contract (ledger/chain/settlement.py).

Raw transactions are signed locally and sent as they were stored; receipts and block hashes are read
fresh each time, so a reorg is seen. A node that does not answer raises `ChainUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexbytes import HexBytes
from web3.exceptions import Web3RPCError

from ledger.chain.client import ChainClient
from ledger.chain.errors import ChainError, ChainUnavailable
from ledger.chain.settlement import PayoutSettler, block_number, mined_nonce, pending_nonce, receipt, send_raw
from ledger.settlement.payouts import PlannedLine

DEFAULT_PRIORITY_FEE = 10**9  # 1 gwei when the node does not suggest one
NONCE_TOO_LOW = ("nonce too low", "nonce is too low", "oldnonce")


class NonceConsumed(ChainError):
    """The transaction's nonce is already used on the chain."""


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int
    block_hash: str
    gas_used: int = 0


class SettlementChain:
    """The operator account and the PayoutSettler contract on one chain."""

    def __init__(self, client: ChainClient, settler: PayoutSettler, *, local: bool = False) -> None:
        self.client = client
        self.settler = settler
        self.local = local
        self.w3 = client.w3

    @property
    def chain_id(self) -> int:
        return self.client.chain_id

    @property
    def operator(self) -> str:
        return self.client.address

    @property
    def settler_address(self) -> str:
        return self.settler.address

    def chain_nonce(self) -> int:
        """The operator's next nonce counting transactions in the node's pool."""
        return pending_nonce(self.client)

    def mined_nonce(self) -> int:
        """The operator's next nonce counting mined transactions only."""
        return mined_nonce(self.client)

    def fees(self) -> tuple[int, int]:
        """(max fee per gas, max priority fee per gas) for a transaction sent now."""
        block = self.client.rpc(lambda: self.w3.eth.get_block("latest"))
        try:
            priority = int(self.client.rpc(lambda: self.w3.eth.max_priority_fee))
        except (ChainUnavailable, Web3RPCError, ValueError):
            priority = DEFAULT_PRIORITY_FEE
        base = int(block.get("baseFeePerGas", 0))
        return 2 * base + priority, priority

    def estimate_gas(self, batch_id: str, manifest_hash: str, lines: list[PlannedLine]) -> int:
        payees, amounts = _columns(lines)
        return self.client.rpc(lambda: self.settler.estimate_settle_gas(
            HexBytes(batch_id), HexBytes(manifest_hash), payees, amounts))

    def sign(self, batch_id: str, manifest_hash: str, lines: list[PlannedLine], *, nonce: int, gas: int,
             max_fee: int, priority_fee: int) -> tuple[str, str]:
        """(raw transaction hex, transaction hash) of `settle` for the batch, signed and not sent."""
        payees, amounts = _columns(lines)
        raw, tx_hash = self.settler.sign_settle(
            HexBytes(batch_id), HexBytes(manifest_hash), payees, amounts, nonce=nonce, gas=gas,
            max_fee_per_gas=max_fee, max_priority_fee_per_gas=priority_fee, chain_id=self.chain_id)
        return HexBytes(raw).to_0x_hex(), HexBytes(tx_hash).to_0x_hex()

    def send(self, raw: str) -> None:
        """Send a stored raw transaction (a node that has it already is fine); NonceConsumed if its nonce is used."""
        try:
            send_raw(self.client, bytes(HexBytes(raw)))
        except ChainError as error:
            if any(text in str(error).lower() for text in NONCE_TOO_LOW):
                raise NonceConsumed(str(error)) from None
            raise

    def receipt(self, tx_hash: str) -> Receipt | None:
        found = receipt(self.client, tx_hash)
        if found is None or found.get("blockNumber") is None:
            return None
        return Receipt(tx_hash, int(found["status"]), int(found["blockNumber"]), HexBytes(found["blockHash"]).to_0x_hex(),
                       int(found.get("gasUsed") or 0))

    def block_number(self) -> int:
        return block_number(self.client)

    def is_settled(self, batch_id: str) -> bool:
        return self.client.rpc(lambda: self.settler.is_settled(HexBytes(batch_id)))

    def settlement_tx(self, batch_id: str) -> str | None:
        """The transaction whose BatchSettled event names the batch, if any."""
        events = self.client.rpc(lambda: self.settler.settlement_events(batch_id=bytes(HexBytes(batch_id))))
        return events[0]["tx_hash"] if events else None

    def mine_if_local(self, blocks: int) -> None:
        """On the local anvil (which mines only when transactions arrive), mine empty blocks for confirmations."""
        if self.local and blocks > 0:
            self.client.rpc(lambda: self.w3.provider.make_request("anvil_mine", [hex(blocks)]))


def _columns(lines: list[PlannedLine]) -> tuple[list[str], list[int]]:
    return [line.address for line in lines], [line.amount for line in lines]
