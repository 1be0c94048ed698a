"""A JSON-RPC client that signs transactions locally with the operator key.

The key is held only inside an eth-account `LocalAccount`; it is never logged and never appears in a
repr or an error message. Reverts become `TransactionReverted`, with the contract's custom error
decoded from the ABI (``VersionAlreadyAnchored(datanetId=0x…, version=1, …)``).
"""

from __future__ import annotations

import ast
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import requests
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractLogicError, TimeExhausted, Web3RPCError
from web3.types import TxReceipt

from ledger.chain.contracts.artifacts import ContractArtifact
from ledger.chain.errors import ChainConfigError, ChainError, ChainUnavailable, TransactionReverted, TransactionTimeout

RECEIPT_TIMEOUT_SECONDS = 120.0
REQUEST_TIMEOUT_SECONDS = 30.0
RECEIPT_POLL_SECONDS = 0.1
ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
PANIC_SELECTOR = bytes.fromhex("4e487b71")  # Panic(uint256)
_BYTES_LITERAL = re.compile(r"""(b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*")""")

T = TypeVar("T")


class ChainClient:
    """One operator account on one chain: deploys contracts, sends transactions, makes calls."""

    def __init__(
        self,
        rpc_url: str,
        private_key: str,
        *,
        receipt_timeout_seconds: float = RECEIPT_TIMEOUT_SECONDS,
        request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        provider = Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": request_timeout_seconds})
        self._setup(Web3(provider), rpc_url, private_key, receipt_timeout_seconds)

    @classmethod
    def from_web3(
        cls,
        w3: Web3,
        private_key: str,
        *,
        label: str = "in-process chain",
        receipt_timeout_seconds: float = RECEIPT_TIMEOUT_SECONDS,
    ) -> ChainClient:
        """A client over an existing Web3 (e.g. ``EthereumTesterProvider`` in tests)."""
        client = cls.__new__(cls)
        client._setup(w3, label, private_key, receipt_timeout_seconds)
        return client

    def _setup(self, w3: Web3, rpc_url: str, private_key: str, receipt_timeout_seconds: float) -> None:
        self.w3 = w3
        self.rpc_url = rpc_url
        self.receipt_timeout_seconds = receipt_timeout_seconds
        self._account: LocalAccount = _account_from_key(private_key)
        self._send_lock = threading.Lock()
        self._chain_id: int | None = None

    @property
    def address(self) -> str:
        """The operator's checksummed address."""
        return self._account.address

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = self._rpc(lambda: self.w3.eth.chain_id)
        return self._chain_id

    def __repr__(self) -> str:
        return f"ChainClient({self.rpc_url!r}, operator={self.address})"

    # -- contracts -------------------------------------------------------------------------------

    def contract(self, artifact: ContractArtifact, address: str) -> Contract:
        return self.w3.eth.contract(address=to_checksum_address(address), abi=artifact.abi)

    def has_code(self, address: str) -> bool:
        """Whether a contract is deployed at `address` on this chain."""
        return len(self._rpc(lambda: self.w3.eth.get_code(to_checksum_address(address)))) > 0

    def deploy(self, artifact: ContractArtifact, *args: Any) -> str:
        """Deploy `artifact` with constructor `args`; returns the checksummed contract address."""
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        receipt = self.transact(factory.constructor(*args), label=f"deploy {artifact.name}")
        address = receipt["contractAddress"]
        if address is None:
            raise TransactionReverted(f"deploy {artifact.name}: the receipt names no contract address")
        return to_checksum_address(address)

    def transact(self, contract_fn: ContractFunction | ContractConstructor, *, label: str | None = None) -> TxReceipt:
        """Sign and send `contract_fn`, wait for its receipt; TransactionReverted when it reverts."""
        label = label or _describe(contract_fn)
        abi = _abi_of(contract_fn)
        with self._send_lock:  # one nonce at a time
            try:
                nonce = self._rpc(lambda: self.w3.eth.get_transaction_count(self.address, "pending"))
                tx = self._rpc(
                    lambda: contract_fn.build_transaction(
                        {"from": self.address, "nonce": nonce, "chainId": self.chain_id}
                    )
                )
            except Exception as exc:  # web3's ContractLogicError, or eth-tester's own TransactionFailed
                if isinstance(exc, ContractLogicError) or _revert_data(exc) is not None:
                    raise _reverted(label, abi, exc) from None
                if isinstance(exc, Web3RPCError):
                    raise ChainError(f"{label}: the node refused the transaction: {exc.message}") from None
                raise
            signed = self._account.sign_transaction(tx)
            try:
                tx_hash = self._rpc(lambda: self.w3.eth.send_raw_transaction(signed.raw_transaction))
            except Web3RPCError as exc:  # nonce too low, underpriced, insufficient funds
                raise ChainError(f"{label}: the node refused the transaction: {exc.message}") from None
        hex_hash = "0x" + bytes(tx_hash).hex()
        try:
            receipt = self._rpc(
                lambda: self.w3.eth.wait_for_transaction_receipt(
                    tx_hash, timeout=self.receipt_timeout_seconds, poll_latency=RECEIPT_POLL_SECONDS
                )
            )
        except TimeExhausted:
            raise TransactionTimeout(
                f"{label}: no receipt for {hex_hash} within {self.receipt_timeout_seconds:g} s (it may still be mined)",
                hex_hash,
            ) from None
        if receipt["status"] != 1:
            raise self._explain_failed_receipt(label, abi, tx, receipt, hex_hash)
        return receipt

    def call(self, contract_fn: ContractFunction, *, label: str | None = None) -> Any:
        """The result of a read-only call; TransactionReverted when it reverts."""
        try:
            return self._rpc(contract_fn.call)
        except Exception as exc:
            if isinstance(exc, ContractLogicError) or _revert_data(exc) is not None:
                raise _reverted(label or _describe(contract_fn), _abi_of(contract_fn), exc) from None
            raise

    # -- helpers ---------------------------------------------------------------------------------

    def rpc(self, request: Callable[[], T]) -> T:
        """Run a web3 request; ChainUnavailable when the node does not answer."""
        return self._rpc(request)

    def _rpc(self, request: Callable[[], T]) -> T:
        try:
            return request()
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ChainUnavailable(f"the chain at {self.rpc_url} does not answer ({type(exc).__name__})") from None

    def _explain_failed_receipt(
        self, label: str, abi: Sequence[dict[str, Any]], tx: dict[str, Any], receipt: TxReceipt, hex_hash: str
    ) -> TransactionReverted:
        """Replay a mined-but-failed transaction as a call for its reason.

        The replay runs on the state after its block: a failed transaction changed nothing, and the
        usual cause (another transaction got there first, e.g. the same version anchored twice) is in it.
        """
        replay = {key: tx[key] for key in ("from", "to", "data", "value") if key in tx}
        try:
            self.w3.eth.call(replay, block_identifier=receipt["blockNumber"])  # type: ignore[arg-type]
        except Exception as exc:
            if isinstance(exc, ContractLogicError) or _revert_data(exc) is not None:
                error = _reverted(label, abi, exc)
                return TransactionReverted(f"{error} (tx {hex_hash})", error.error_name, error.error_args)
        return TransactionReverted(f"{label} reverted in tx {hex_hash} (reason unknown)")


def _account_from_key(private_key: str) -> LocalAccount:
    try:
        return Account.from_key(private_key)
    except Exception:  # the library's message may quote the key
        raise ChainConfigError("the operator key is not a valid secp256k1 private key (32 bytes, hex)") from None


def _describe(contract_fn: ContractFunction | ContractConstructor) -> str:
    name = getattr(contract_fn, "fn_name", None)
    return f"{name}()" if name else "constructor"


def _abi_of(contract_fn: ContractFunction | ContractConstructor) -> Sequence[dict[str, Any]]:
    return getattr(contract_fn, "contract_abi", None) or getattr(contract_fn, "abi", None) or []


def _revert_data(exc: BaseException) -> bytes | None:
    """The raw revert data of an exception raised by web3 (``.data`` hex) or eth-tester (bytes in the message)."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    for arg in exc.args:
        if isinstance(arg, (bytes, bytearray)):
            return bytes(arg)
        if isinstance(arg, str) and "revert" in arg:
            match = _BYTES_LITERAL.search(arg)
            if match:
                try:
                    value = ast.literal_eval(match.group(1))
                except (ValueError, SyntaxError):
                    return None
                return value if isinstance(value, bytes) else None
    return None


def _reverted(label: str, abi: Sequence[dict[str, Any]], exc: BaseException) -> TransactionReverted:
    data = _revert_data(exc)
    if data is None or len(data) < 4:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return TransactionReverted(f"{label} reverted: {message}")
    name, args, text = decode_revert(abi, data)
    return TransactionReverted(f"{label} reverted: {text}", name, args)


def decode_revert(abi: Sequence[dict[str, Any]], data: bytes) -> tuple[str | None, tuple[object, ...], str]:
    """(error name, arguments, readable text) of revert data, using the ABI's custom errors."""
    selector, payload = data[:4], data[4:]
    if selector == ERROR_STRING_SELECTOR:
        (reason,) = abi_decode(["string"], payload)
        return "Error", (reason,), reason
    if selector == PANIC_SELECTOR:
        (code,) = abi_decode(["uint256"], payload)
        return "Panic", (code,), f"Panic(0x{code:02x})"
    for entry in abi:
        if entry.get("type") != "error":
            continue
        types = [_abi_type(item) for item in entry["inputs"]]
        if keccak(text=f"{entry['name']}({','.join(types)})")[:4] != selector:
            continue
        try:
            args = tuple(abi_decode(types, payload))
        except Exception:
            break
        shown = ", ".join(
            f"{item['name'] or i}={_show(item['type'], value)}"
            for i, (item, value) in enumerate(zip(entry["inputs"], args))
        )
        return entry["name"], args, f"{entry['name']}({shown})"
    return None, (), f"unknown error 0x{data.hex()}"


def _abi_type(item: dict[str, Any]) -> str:
    kind = item["type"]
    if kind.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in item["components"]) + ")" + kind[len("tuple") :]
    return kind


def _show(abi_type: str, value: object) -> str:
    if abi_type == "address" and isinstance(value, str):
        return to_checksum_address(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return str(value)
