"""PayoutSettler on a real anvil node: deployment record, a 400-payee batch, events, replay, raw sending."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_utils import keccak, to_checksum_address

from ledger.chain.client import ChainClient
from ledger.chain.errors import ChainError, TransactionReverted
from ledger.chain.registry import ensure_registry, read_deployment
from ledger.chain.settlement import (
    PayoutSettler,
    PayoutToken,
    block_number,
    ensure_settlement,
    mined_nonce,
    pending_nonce,
    receipt,
    send_raw,
)

FUND = 10**27  # 1B DPT
MANIFEST = keccak(text="anvil manifest")


def payees(n: int, tag: str) -> list[str]:
    return [to_checksum_address(keccak(text=f"anvil payee {tag} {i}")[:20]) for i in range(n)]


def test_ensure_settlement_deploys_once_funds_the_treasury_and_keeps_other_keys(
    anvil_client: ChainClient, tmp_path: Path
) -> None:
    deployment = tmp_path / "chain" / "deployment.json"
    registry = ensure_registry(anvil_client, deployment)

    token, settler = ensure_settlement(anvil_client, deployment, fund=FUND)

    assert read_deployment(deployment) == {
        "chain_id": 31337,
        "registry": registry.address,
        "token": token.address,
        "settler": settler.address,
    }
    assert settler.token_address == token.address
    assert settler.owner() == anvil_client.address
    assert token.balance_of(settler.address) == FUND
    again_token, again_settler = ensure_settlement(anvil_client, deployment, fund=FUND)
    assert (again_token.address, again_settler.address) == (token.address, settler.address)
    assert token.balance_of(settler.address) == FUND  # not minted twice
    assert ensure_registry(anvil_client, deployment).address == registry.address


def test_ensure_settlement_reuses_a_recorded_token_and_replaces_stale_addresses(
    anvil_client: ChainClient, tmp_path: Path
) -> None:
    existing = PayoutToken.deploy(anvil_client)  # as production records an existing token
    deployment = tmp_path / "deployment.json"
    no_code = "0x" + "12" * 20
    deployment.write_text(json.dumps({"chain_id": 31337, "token": existing.address, "settler": no_code}))

    token, settler = ensure_settlement(anvil_client, deployment, fund=FUND)

    assert token.address == existing.address
    assert settler.address != to_checksum_address(no_code) and settler.token_address == existing.address
    assert token.balance_of(settler.address) == 0  # an existing token is never minted; the operator funds it
    other_settler = PayoutSettler.deploy(anvil_client, PayoutToken.deploy(anvil_client).address)
    deployment.write_text(json.dumps({"chain_id": 31337, "token": existing.address, "settler": other_settler.address}))
    assert ensure_settlement(anvil_client, deployment)[1].address not in (other_settler.address, settler.address)
    with pytest.raises(ValueError, match="fund must be an integer"):
        ensure_settlement(anvil_client, deployment, fund=-1)


def test_400_payees_settle_in_one_transaction_and_replay_reverts(anvil_client: ChainClient, tmp_path: Path) -> None:
    token, settler = ensure_settlement(anvil_client, tmp_path / "deployment.json", fund=FUND)
    recipients = payees(400, "big")
    amounts = [10**15 * (i + 1) + 7 for i in range(400)]
    batch = keccak(text="anvil batch of 400")
    first_block = block_number(anvil_client)

    tx_receipt = settler.settle(batch, MANIFEST, recipients, amounts)

    gas_limit = anvil_client.w3.eth.get_block(tx_receipt["blockNumber"])["gasLimit"]
    assert tx_receipt["status"] == 1 and tx_receipt["gasUsed"] < gas_limit
    assert tx_receipt["gasUsed"] < 400 * 22_100 * 1.25  # new holders: within 25% of the storage-write floor
    assert [token.balance_of(p) for p in recipients] == amounts
    assert token.balance_of(settler.address) == FUND - sum(amounts)
    (event,) = settler.settlement_events(from_block=first_block)
    assert event == {
        "batch_id": "0x" + batch.hex(),
        "manifest_hash": "0x" + MANIFEST.hex(),
        "count": 400,
        "total": sum(amounts),
        "tx_hash": "0x" + bytes(tx_receipt["transactionHash"]).hex(),
        "block_number": tx_receipt["blockNumber"],
    }
    with pytest.raises(TransactionReverted) as caught:
        settler.settle(batch, MANIFEST, recipients, amounts)
    assert caught.value.error_name == "BatchAlreadySettled"
    assert [token.balance_of(p) for p in recipients[:3]] == amounts[:3]
    assert len(settler.settlement_events(from_block=first_block)) == 1


def test_a_signed_settle_is_sent_raw_once_even_when_resent(anvil_client: ChainClient, tmp_path: Path) -> None:
    token, settler = ensure_settlement(anvil_client, tmp_path / "deployment.json", fund=FUND)
    recipients, amounts = payees(3, "raw"), [1, 2, 3]
    batch = keccak(text="anvil raw batch")
    w3 = anvil_client.w3
    base_fee = w3.eth.get_block("latest")["baseFeePerGas"]
    nonce = pending_nonce(anvil_client)
    assert nonce == mined_nonce(anvil_client)
    raw, tx_hash = settler.sign_settle(
        batch,
        MANIFEST,
        recipients,
        amounts,
        nonce=nonce,
        gas=settler.estimate_settle_gas(batch, MANIFEST, recipients, amounts),
        max_fee_per_gas=2 * base_fee + 10**9,
        max_priority_fee_per_gas=10**9,
        chain_id=anvil_client.chain_id,
    )

    w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        assert send_raw(anvil_client, raw) == tx_hash
        assert send_raw(anvil_client, raw) == tx_hash  # a resend while pending (after a crash) is harmless
        assert receipt(anvil_client, tx_hash) is None
        assert pending_nonce(anvil_client) == nonce + 1 and mined_nonce(anvil_client) == nonce
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]

    tx_receipt = receipt(anvil_client, tx_hash)
    assert tx_receipt is not None and tx_receipt["status"] == 1
    assert settler.is_settled(batch)
    assert [token.balance_of(p) for p in recipients] == amounts
    with pytest.raises(ChainError, match="nonce"):  # once mined, the node refuses the same bytes
        send_raw(anvil_client, raw)
