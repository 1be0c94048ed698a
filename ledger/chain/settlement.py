"""The payout contracts: PayoutToken (local ERC-20) and PayoutSettler (batch payouts from its treasury).

Guarantees (of the contract, see ``IPayoutSettler.sol``): a batch id settles at most once; a batch
pays every payee exactly or nobody; only the operator (the client's account) settles; each settled
batch emits one ``BatchSettled(batchId, manifestHash, count, total)``. The treasury is the token
balance of the settler's address: fund it with `PayoutToken.transfer` (or `mint` on the local token).

Two ways to settle: `PayoutSettler.settle` signs, sends and waits through `ChainClient.transact`
(nonce from the node); a crash-safe settler that keeps its own nonces signs with
`PayoutSettler.sign_settle`, records the raw transaction and its hash, then sends it with
`send_raw` (and again after a crash: resending the same bytes is harmless) and polls `receipt`.

Amounts are integers in base units (10**-18 DPT); batch ids and manifest hashes are 32 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict, TypeVar

from eth_account.datastructures import SignedTransaction
from eth_utils import is_address, keccak, to_checksum_address
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
from web3.types import TxParams, TxReceipt

from ledger.chain.client import ChainClient, _abi_of, _revert_data, _reverted
from ledger.chain.contracts.artifacts import ContractArtifact, load_artifact
from ledger.chain.errors import ChainError
from ledger.chain.registry import _locked, read_deployment, write_deployment

TOKEN_CONTRACT = "PayoutToken"
SETTLER_CONTRACT = "PayoutSettler"
TOKEN_KEY = "token"
SETTLER_KEY = "settler"
UINT256_MAX = 2**256 - 1
SETTLE_PAYEES_MAX = 800
"""Payees per batch. A new holder costs ~25.5k gas, so 800 payees stay near 21M gas, under a 30M block."""
_ALREADY_KNOWN = ("already known", "already imported", "known transaction")

T = TypeVar("T")


class SettlementEvent(TypedDict):
    """A decoded ``BatchSettled`` log."""

    batch_id: str  # 0x + 64 hex
    manifest_hash: str  # 0x + 64 hex
    count: int
    total: int  # base units
    tx_hash: str  # 0x + 64 hex
    block_number: int


class PayoutToken:
    """A deployed ERC-20 used for payouts; `mint` works only on the local PayoutToken (owner = client)."""

    def __init__(self, client: ChainClient, address: str) -> None:
        self.client = client
        self.address = to_checksum_address(address)
        self.artifact: ContractArtifact = load_artifact(TOKEN_CONTRACT)
        self._contract = client.contract(self.artifact, self.address)

    @classmethod
    def deploy(cls, client: ChainClient) -> PayoutToken:
        """Deploy a new PayoutToken owned (minted) by the client's account."""
        return cls(client, client.deploy(load_artifact(TOKEN_CONTRACT), client.address))

    def __repr__(self) -> str:
        return f"PayoutToken({self.address} via {self.client!r})"

    def mint(self, to: str, amount: int) -> str:
        """Create `amount` base units for `to`; returns the transaction hash. Owner only."""
        fn = self._contract.functions.mint(_address(to, "to"), _uint256(amount, "amount"))
        return _tx_hash(self.client.transact(fn, label=f"mint({amount})"))

    def transfer(self, to: str, amount: int) -> str:
        """Send `amount` base units from the client's account to `to`; returns the transaction hash."""
        fn = self._contract.functions.transfer(_address(to, "to"), _uint256(amount, "amount"))
        return _tx_hash(self.client.transact(fn, label=f"transfer({amount})"))

    def balance_of(self, address: str) -> int:
        """Base units held by `address`."""
        return int(self.client.call(self._contract.functions.balanceOf(_address(address, "address", allow_zero=True))))

    def total_supply(self) -> int:
        return int(self.client.call(self._contract.functions.totalSupply()))


class PayoutSettler:
    """A deployed PayoutSettler, operated by `client`'s account (the contract's owner)."""

    def __init__(self, client: ChainClient, address: str) -> None:
        self.client = client
        self.address = to_checksum_address(address)
        self.artifact: ContractArtifact = load_artifact(SETTLER_CONTRACT)
        self._contract = client.contract(self.artifact, self.address)
        self._token_address: str | None = None

    @classmethod
    def deploy(cls, client: ChainClient, token_address: str) -> PayoutSettler:
        """Deploy a new settler paying in `token_address`, operated by the client's account."""
        artifact = load_artifact(SETTLER_CONTRACT)
        return cls(client, client.deploy(artifact, _address(token_address, "token_address"), client.address))

    def __repr__(self) -> str:
        return f"PayoutSettler({self.address} via {self.client!r})"

    @property
    def token_address(self) -> str:
        """The ERC-20 the settler pays in (read once from the contract)."""
        if self._token_address is None:
            self._token_address = to_checksum_address(self.client.call(self._contract.functions.token()))
        return self._token_address

    def owner(self) -> str:
        return to_checksum_address(self.client.call(self._contract.functions.owner()))

    def is_settled(self, batch_id: bytes) -> bool:
        """Whether `batch_id` is settled on-chain (as of the latest block)."""
        return bool(self.client.call(self._contract.functions.settled(_bytes32(batch_id, "batch_id"))))

    def settle(
        self, batch_id: bytes, manifest_hash: bytes, payees: Sequence[str], amounts: Sequence[int]
    ) -> TxReceipt:
        """Pay the batch and wait for its receipt.

        Raises ValueError for malformed arguments (before anything is sent) and TransactionReverted
        (``error_name`` ``BatchAlreadySettled``, ``InsufficientTreasury``, ``OwnableUnauthorizedAccount``, …)
        when the contract refuses.
        """
        fn = self._settle_fn(batch_id, manifest_hash, payees, amounts)
        return self.client.transact(fn, label=f"settle(batch 0x{batch_id.hex()}, {len(payees)} payees)")

    def estimate_settle_gas(
        self, batch_id: bytes, manifest_hash: bytes, payees: Sequence[str], amounts: Sequence[int]
    ) -> int:
        """Gas the batch needs as of the latest block; TransactionReverted when it would revert."""
        fn = self._settle_fn(batch_id, manifest_hash, payees, amounts)
        return _guarded(self.client, fn, "estimate settle", lambda: int(fn.estimate_gas({"from": self.client.address})))

    def sign_settle(
        self,
        batch_id: bytes,
        manifest_hash: bytes,
        payees: Sequence[str],
        amounts: Sequence[int],
        *,
        nonce: int,
        gas: int,
        max_fee_per_gas: int,
        max_priority_fee_per_gas: int,
        chain_id: int,
    ) -> tuple[bytes, str]:
        """The signed EIP-1559 settle transaction (raw bytes) and its hash (0x hex); nothing is sent.

        Every field is the caller's, so signing makes no request to the node: the same arguments
        always give the same bytes and hash, which a crash-safe settler records before sending.
        """
        for value, what in ((nonce, "nonce"), (gas, "gas"), (max_fee_per_gas, "max_fee_per_gas"),
                            (max_priority_fee_per_gas, "max_priority_fee_per_gas"), (chain_id, "chain_id")):
            _uint256(value, what)
        if max_priority_fee_per_gas > max_fee_per_gas:
            raise ValueError("max_priority_fee_per_gas must not exceed max_fee_per_gas")
        fn = self._settle_fn(batch_id, manifest_hash, payees, amounts)
        tx = fn.build_transaction(
            {
                "type": 2,
                "from": self.client.address,
                "nonce": nonce,
                "gas": gas,
                "maxFeePerGas": max_fee_per_gas,
                "maxPriorityFeePerGas": max_priority_fee_per_gas,
                "chainId": chain_id,
                "value": 0,
            }
        )
        signed = sign_transaction(self.client, tx)
        return bytes(signed.raw_transaction), "0x" + bytes(signed.hash).hex()

    def settlement_events(
        self,
        from_block: int = 0,
        to_block: int | str = "latest",
        *,
        batch_id: bytes | None = None,
    ) -> list[SettlementEvent]:
        """Decoded ``BatchSettled`` logs in the block range, oldest first (optionally of one batch).

        Public nodes cap the range of one ``eth_getLogs``; page through long ranges on them.
        """
        filters = None if batch_id is None else {"batchId": _bytes32(batch_id, "batch_id")}
        logs = self.client.rpc(
            lambda: self._contract.events.BatchSettled().get_logs(
                argument_filters=filters, from_block=from_block, to_block=to_block
            )
        )
        return [
            SettlementEvent(
                batch_id="0x" + bytes(log["args"]["batchId"]).hex(),
                manifest_hash="0x" + bytes(log["args"]["manifestHash"]).hex(),
                count=int(log["args"]["count"]),
                total=int(log["args"]["total"]),
                tx_hash="0x" + bytes(log["transactionHash"]).hex(),
                block_number=int(log["blockNumber"]),
            )
            for log in sorted(logs, key=lambda entry: (entry["blockNumber"], entry["logIndex"]))
        ]

    def _settle_fn(
        self, batch_id: bytes, manifest_hash: bytes, payees: Sequence[str], amounts: Sequence[int]
    ) -> ContractFunction:
        if isinstance(payees, (str, bytes)) or isinstance(amounts, (str, bytes)):
            raise ValueError("payees and amounts must be sequences")
        if len(payees) != len(amounts):
            raise ValueError(f"{len(payees)} payees but {len(amounts)} amounts")
        if not payees:
            raise ValueError("a batch pays at least one payee")
        if len(payees) > SETTLE_PAYEES_MAX:
            raise ValueError(f"{len(payees)} payees exceed SETTLE_PAYEES_MAX ({SETTLE_PAYEES_MAX}); split the batch")
        return self._contract.functions.settle(
            _bytes32(batch_id, "batch_id"),
            _bytes32(manifest_hash, "manifest_hash"),
            [_address(payee, f"payees[{i}]") for i, payee in enumerate(payees)],
            [_uint256(amount, f"amounts[{i}]") for i, amount in enumerate(amounts)],
        )


def ensure_settlement(client: ChainClient, deployment_file: Path, *, fund: int = 0) -> tuple[PayoutToken, PayoutSettler]:
    """The token and settler recorded in `deployment_file` when they have code on this chain, else new ones.

    Keys ``token`` and ``settler`` in the same JSON record as the registry (other keys kept), under
    the same lock. A recorded token with code is reused as is (production records an existing
    token there); a new local PayoutToken is deployed otherwise, and then `fund` base units are
    minted to the settler (the funded treasury). A recorded settler is reused only when it pays in
    that token.
    """
    _uint256(fund, "fund")
    with _locked(deployment_file):
        record = read_deployment(deployment_file)
        same_chain = record.get("chain_id") == client.chain_id
        token_address, settler_address = record.get(TOKEN_KEY), record.get(SETTLER_KEY)
        token: PayoutToken | None = None
        if same_chain and isinstance(token_address, str) and is_address(token_address) and client.has_code(token_address):
            token = PayoutToken(client, token_address)
        token_is_new = token is None
        if token is None:
            token = PayoutToken.deploy(client)
        settler: PayoutSettler | None = None
        if (
            not token_is_new
            and isinstance(settler_address, str)
            and is_address(settler_address)
            and client.has_code(settler_address)
        ):
            candidate = PayoutSettler(client, settler_address)
            if candidate.token_address == token.address:
                settler = candidate
        if settler is None:
            settler = PayoutSettler.deploy(client, token.address)
        if token_is_new and fund > 0:
            token.mint(settler.address, fund)
        record.update({"chain_id": client.chain_id, TOKEN_KEY: token.address, SETTLER_KEY: settler.address})
        write_deployment(deployment_file, record)
        return token, settler


# -- helpers over a ChainClient (candidates for ChainClient methods) -----------------------------


def sign_transaction(client: ChainClient, tx: TxParams | dict[str, Any]) -> SignedTransaction:
    """`tx` signed with the client's operator key (which never leaves the client's account object)."""
    return client._account.sign_transaction(tx)  # type: ignore[arg-type]


def send_raw(client: ChainClient, raw_transaction: bytes) -> str:
    """Send a signed transaction; returns its hash (0x hex) without waiting for the receipt.

    Sending bytes the node already holds (a resend after a crash) answers the same hash; other
    refusals (nonce too low, underpriced, insufficient funds) raise ChainError with the node's words.
    """
    tx_hash = "0x" + keccak(raw_transaction).hex()
    try:
        client.rpc(lambda: client.w3.eth.send_raw_transaction(raw_transaction))
    except Web3RPCError as exc:
        message = str(exc.message or exc)
        if any(marker in message.lower() for marker in _ALREADY_KNOWN):
            return tx_hash
        raise ChainError(f"send {tx_hash}: the node refused the transaction: {message}") from None
    return tx_hash


def pending_nonce(client: ChainClient) -> int:
    """The operator's next nonce counting transactions in the node's pool."""
    return int(client.rpc(lambda: client.w3.eth.get_transaction_count(client.address, "pending")))


def mined_nonce(client: ChainClient) -> int:
    """The operator's next nonce counting only mined transactions."""
    return int(client.rpc(lambda: client.w3.eth.get_transaction_count(client.address, "latest")))


def receipt(client: ChainClient, tx_hash: str) -> TxReceipt | None:
    """The receipt of `tx_hash`, None while it is not mined (or unknown to the node)."""
    try:
        return client.rpc(lambda: client.w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
    except TransactionNotFound:
        return None


def block_number(client: ChainClient) -> int:
    return int(client.rpc(lambda: client.w3.eth.block_number))


def _guarded(client: ChainClient, fn: ContractFunction, label: str, request: Callable[[], T]) -> T:
    try:
        return client.rpc(request)
    except Exception as exc:  # web3's ContractLogicError, or eth-tester's own TransactionFailed
        if isinstance(exc, ContractLogicError) or _revert_data(exc) is not None:
            raise _reverted(label, _abi_of(fn), exc) from None
        if isinstance(exc, Web3RPCError):
            raise ChainError(f"{label}: the node refused: {exc.message}") from None
        raise


def _tx_hash(tx_receipt: TxReceipt) -> str:
    return "0x" + bytes(tx_receipt["transactionHash"]).hex()


def _address(value: str, what: str, *, allow_zero: bool = False) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise ValueError(f"{what} must be a 20-byte hex address, got {value!r}")
    if not allow_zero and int(value, 16) == 0:
        raise ValueError(f"{what} must not be the zero address")
    return to_checksum_address(value)


def _bytes32(value: bytes, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(value)


def _uint256(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT256_MAX:
        raise ValueError(f"{what} must be an integer in [0, 2**256 - 1], got {value!r}")
    return value
