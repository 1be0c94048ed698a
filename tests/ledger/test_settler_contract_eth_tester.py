"""PayoutSettler and PayoutToken on the in-process eth-tester chain (py-evm): payout rules and refusals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from eth_tester import EthereumTester
from eth_utils import keccak, to_checksum_address
from web3.logs import DISCARD

from ledger.chain.client import ChainClient
from tests.support.eth_tester_chain import in_process_chain
from ledger.chain.errors import TransactionReverted
from ledger.chain.settlement import (
    PayoutSettler,
    PayoutToken,
    block_number,
    pending_nonce,
    receipt,
    send_raw,
)

TREASURY = 10**24  # 1M DPT
BATCH = keccak(text="batch 1")
MANIFEST = keccak(text="manifest of batch 1")
ZERO_ADDRESS = "0x" + "00" * 20


def payee(i: int) -> str:
    return to_checksum_address(keccak(text=f"payee {i}")[:20])


PAYEES = [payee(i) for i in range(5)]
AMOUNTS = [10**18 * (i + 1) + i for i in range(5)]  # distinct, not round


@dataclass
class Chain:
    tester: EthereumTester
    operator: ChainClient
    stranger: ChainClient
    token: PayoutToken
    settler: PayoutSettler


@pytest.fixture()
def chain() -> Chain:
    tester, (operator, stranger) = in_process_chain()
    token = PayoutToken.deploy(operator)
    settler = PayoutSettler.deploy(operator, token.address)
    token.mint(settler.address, TREASURY)
    return Chain(tester, operator, stranger, token, settler)


def balances(chain: Chain, addresses: list[str]) -> list[int]:
    return [chain.token.balance_of(address) for address in addresses]


def raw_settle(chain: Chain, client: ChainClient, *args: Any) -> None:
    """Send settle() without the wrapper's argument checks, to see the contract's own refusals."""
    contract = client.contract(chain.settler.artifact, chain.settler.address)
    client.transact(contract.functions.settle(*args))


def test_token_and_settler_are_set_up_as_deployed(chain: Chain) -> None:
    contract = chain.operator.contract(chain.token.artifact, chain.token.address)
    assert contract.functions.name().call() == "Datanet Payout Token"
    assert contract.functions.symbol().call() == "DPT"
    assert contract.functions.decimals().call() == 18
    assert chain.token.total_supply() == TREASURY
    assert chain.settler.token_address == chain.token.address
    assert chain.settler.owner() == chain.operator.address
    assert chain.token.balance_of(chain.settler.address) == TREASURY
    with pytest.raises(TransactionReverted) as caught:
        PayoutToken(chain.stranger, chain.token.address).mint(chain.stranger.address, 1)
    assert caught.value.error_name == "OwnableUnauthorizedAccount"


def test_settle_pays_every_payee_exactly_and_emits_one_event(chain: Chain) -> None:
    assert not chain.settler.is_settled(BATCH)

    tx_receipt = chain.settler.settle(BATCH, MANIFEST, PAYEES, AMOUNTS)

    assert tx_receipt["status"] == 1
    assert chain.settler.is_settled(BATCH)
    assert balances(chain, PAYEES) == AMOUNTS
    assert chain.token.balance_of(chain.settler.address) == TREASURY - sum(AMOUNTS)
    settler = chain.operator.contract(chain.settler.artifact, chain.settler.address)
    (event,) = settler.events.BatchSettled().process_receipt(tx_receipt, errors=DISCARD)
    assert event["args"] == {"batchId": BATCH, "manifestHash": MANIFEST, "count": 5, "total": sum(AMOUNTS)}
    token = chain.operator.contract(chain.token.artifact, chain.token.address)
    transfers = token.events.Transfer().process_receipt(tx_receipt, errors=DISCARD)
    assert [(t["args"]["from"], t["args"]["to"], t["args"]["value"]) for t in transfers] == [
        (chain.settler.address, p, a) for p, a in zip(PAYEES, AMOUNTS)
    ]
    assert chain.settler.settlement_events() == [
        {
            "batch_id": "0x" + BATCH.hex(),
            "manifest_hash": "0x" + MANIFEST.hex(),
            "count": 5,
            "total": sum(AMOUNTS),
            "tx_hash": "0x" + bytes(tx_receipt["transactionHash"]).hex(),
            "block_number": tx_receipt["blockNumber"],
        }
    ]


def test_a_replayed_batch_id_reverts_and_pays_nothing_twice(chain: Chain) -> None:
    chain.settler.settle(BATCH, MANIFEST, PAYEES, AMOUNTS)
    for payees, amounts in ((PAYEES, AMOUNTS), (PAYEES[:1], [7])):  # same content, or different
        with pytest.raises(TransactionReverted) as caught:
            chain.settler.settle(BATCH, MANIFEST, payees, amounts)
        assert caught.value.error_name == "BatchAlreadySettled"
        assert caught.value.error_args == (BATCH,)
    assert balances(chain, PAYEES) == AMOUNTS
    assert len(chain.settler.settlement_events()) == 1
    second = keccak(text="batch 2")
    chain.settler.settle(second, MANIFEST, PAYEES[:1], [7])  # a new id settles
    assert chain.token.balance_of(PAYEES[0]) == AMOUNTS[0] + 7
    assert [e["batch_id"] for e in chain.settler.settlement_events(batch_id=second)] == ["0x" + second.hex()]


def test_only_the_operator_settles(chain: Chain) -> None:
    as_stranger = PayoutSettler(chain.stranger, chain.settler.address)
    with pytest.raises(TransactionReverted) as caught:
        as_stranger.settle(BATCH, MANIFEST, PAYEES, AMOUNTS)
    assert caught.value.error_name == "OwnableUnauthorizedAccount"
    assert caught.value.error_args[0].lower() == chain.stranger.address.lower()
    assert not as_stranger.is_settled(BATCH)  # reading is open to anyone
    assert balances(chain, PAYEES) == [0] * 5


@pytest.mark.parametrize(
    ("batch_id", "payees", "amounts", "error", "error_args"),
    [
        (BATCH, PAYEES, AMOUNTS[:4], "LengthMismatch", (5, 4)),
        (BATCH, PAYEES[:2], AMOUNTS, "LengthMismatch", (2, 5)),
        (BATCH, [], [], "NoPayees", ()),
        (BATCH, [PAYEES[0], ZERO_ADDRESS, PAYEES[2]], AMOUNTS[:3], "PayeeIsZero", (1,)),
        (BATCH, PAYEES[:3], [1, 2, 0], "AmountIsZero", (2,)),
        (bytes(32), PAYEES, AMOUNTS, "BatchIdIsZero", ()),
    ],
)
def test_malformed_batches_revert_with_their_error(
    chain: Chain, batch_id: bytes, payees: list[str], amounts: list[int], error: str, error_args: tuple[object, ...]
) -> None:
    with pytest.raises(TransactionReverted) as caught:
        raw_settle(chain, chain.operator, batch_id, MANIFEST, payees, amounts)
    assert caught.value.error_name == error
    assert caught.value.error_args == error_args
    assert not chain.settler.is_settled(batch_id)
    assert balances(chain, PAYEES) == [0] * 5


def test_the_wrapper_checks_arguments_before_sending(chain: Chain) -> None:
    nonce = pending_nonce(chain.operator)
    cases = {
        "5 payees but 4 amounts": (BATCH, MANIFEST, PAYEES, AMOUNTS[:4]),
        "at least one payee": (BATCH, MANIFEST, [], []),
        r"payees\[1\] must not be the zero address": (BATCH, MANIFEST, [PAYEES[0], ZERO_ADDRESS], [1, 2]),
        r"amounts\[0\] must be an integer": (BATCH, MANIFEST, PAYEES[:1], [-1]),
        "batch_id must be 32 bytes": (b"batch 1", MANIFEST, PAYEES, AMOUNTS),
        "manifest_hash must be 32 bytes": (BATCH, MANIFEST.hex(), PAYEES, AMOUNTS),
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            chain.settler.settle(*args)
    assert pending_nonce(chain.operator) == nonce  # nothing was sent


def test_an_underfunded_settler_reverts_and_pays_nobody(chain: Chain) -> None:
    amounts = [1, 2, TREASURY]  # the first two fit, the batch does not
    with pytest.raises(TransactionReverted) as caught:
        chain.settler.settle(BATCH, MANIFEST, PAYEES[:3], amounts)
    assert caught.value.error_name == "InsufficientTreasury"
    assert caught.value.error_args == (TREASURY, TREASURY + 3)
    assert not chain.settler.is_settled(BATCH)
    assert balances(chain, PAYEES[:3]) == [0, 0, 0]
    assert chain.token.balance_of(chain.settler.address) == TREASURY

    chain.token.mint(chain.operator.address, 3)
    chain.token.transfer(chain.settler.address, 3)  # the operator tops the treasury up
    chain.settler.settle(BATCH, MANIFEST, PAYEES[:3], amounts)
    assert balances(chain, PAYEES[:3]) == amounts
    assert chain.token.balance_of(chain.settler.address) == 0


def test_signed_settle_sent_raw_settles(chain: Chain) -> None:
    w3 = chain.operator.w3
    gas = chain.settler.estimate_settle_gas(BATCH, MANIFEST, PAYEES, AMOUNTS)
    base_fee = w3.eth.get_block("latest")["baseFeePerGas"]
    fields = {
        "nonce": pending_nonce(chain.operator),
        "gas": gas,
        "max_fee_per_gas": 2 * base_fee + 10**9,
        "max_priority_fee_per_gas": 10**9,
        "chain_id": chain.operator.chain_id,
    }
    block_before = block_number(chain.operator)

    raw, tx_hash = chain.settler.sign_settle(BATCH, MANIFEST, PAYEES, AMOUNTS, **fields)

    assert (raw, tx_hash) == chain.settler.sign_settle(BATCH, MANIFEST, PAYEES, AMOUNTS, **fields)  # deterministic
    assert receipt(chain.operator, tx_hash) is None
    assert block_number(chain.operator) == block_before  # signing sent nothing
    assert send_raw(chain.operator, raw) == tx_hash
    tx_receipt = receipt(chain.operator, tx_hash)
    assert tx_receipt is not None and tx_receipt["status"] == 1
    assert tx_receipt["type"] == 2 and tx_receipt["gasUsed"] <= gas
    assert chain.settler.is_settled(BATCH)
    assert balances(chain, PAYEES) == AMOUNTS
    (event,) = chain.settler.settlement_events()
    assert event["tx_hash"] == tx_hash


def test_estimating_a_refused_batch_names_the_error(chain: Chain) -> None:
    chain.settler.settle(BATCH, MANIFEST, PAYEES, AMOUNTS)
    with pytest.raises(TransactionReverted) as caught:
        chain.settler.estimate_settle_gas(BATCH, MANIFEST, PAYEES, AMOUNTS)
    assert caught.value.error_name == "BatchAlreadySettled"


def test_gas_per_payee_stays_near_the_storage_write_floor(chain: Chain) -> None:
    """Gas benchmark (full table: loadtests/bench_settlement_gas.py): marginal gas per payee, 20 vs 60 payees."""
    groups = {20: [payee(1000 + i) for i in range(20)], 60: [payee(2000 + i) for i in range(60)]}
    used: dict[tuple[str, int], int] = {}
    for holders in ("new", "existing"):  # the second round pays the same addresses again
        for n, payees in groups.items():
            batch = keccak(text=f"gas {holders} {n}")
            used[holders, n] = chain.settler.settle(batch, MANIFEST, payees, [10**18] * n)["gasUsed"]
    new = (used["new", 60] - used["new", 20]) / 40
    existing = (used["existing", 60] - used["existing", 20]) / 40
    assert new < 22_100 * 1.25, used  # 26.1k with solc 0.8.37: the balance slot, the Transfer log, the call
    assert existing < 5_000 * 1.9, used  # 9.0k: the token's Transfer log alone is 1.8k of it
