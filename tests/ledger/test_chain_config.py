"""Chain settings: the operator key comes from env or a file, and defaults to anvil's only locally."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ledger.chain.anvil import ANVIL_DEV_KEYS
from ledger.chain.config import ChainConfig
from ledger.chain.errors import ChainConfigError

KEY = "0x" + "ab" * 32


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RPC_URL", "PORT", "CHAIN_ID", "OPERATOR_KEY", "OPERATOR_KEY_FILE"):
        monkeypatch.delenv(f"GATEWAY_CHAIN_{name}", raising=False)


def test_defaults_are_the_local_anvil_with_dev_key_zero() -> None:
    config = ChainConfig()
    assert (config.rpc_url, config.port, config.chain_id) == (None, 8545, 31337)
    assert config.uses_local_node
    assert config.private_key() == ANVIL_DEV_KEYS[0]
    assert config.private_key(local=True) == ANVIL_DEV_KEYS[0]


def test_a_remote_chain_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CHAIN_RPC_URL", "https://rpc.example.org")
    config = ChainConfig()
    assert not config.uses_local_node
    with pytest.raises(ChainConfigError, match="GATEWAY_CHAIN_OPERATOR_KEY_FILE"):
        config.private_key()


def test_key_from_env_is_secret_and_normalized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CHAIN_RPC_URL", "https://rpc.example.org")
    monkeypatch.setenv("GATEWAY_CHAIN_OPERATOR_KEY", KEY.upper().replace("0X", ""))
    config = ChainConfig()
    assert config.private_key() == KEY
    assert "ab" * 32 not in repr(config) and "AB" * 32 not in repr(config)


def test_key_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "operator.key"
    key_file.write_text(f"  {KEY}\n")
    monkeypatch.setenv("GATEWAY_CHAIN_OPERATOR_KEY_FILE", str(key_file))
    assert ChainConfig(rpc_url="https://rpc.example.org").private_key() == KEY
    with pytest.raises(ChainConfigError, match="cannot read the operator key file"):
        ChainConfig(operator_key_file=tmp_path / "missing.key").private_key()


def test_a_malformed_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ChainConfigError, match="32 bytes of hex") as caught:
        ChainConfig(operator_key="0x" + "ab" * 31 + "zz").private_key()
    assert "abab" not in str(caught.value)


def test_both_key_sources_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not both"):
        ChainConfig(operator_key=KEY, operator_key_file=tmp_path / "k")


def test_an_empty_rpc_url_means_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CHAIN_RPC_URL", "")
    assert ChainConfig().uses_local_node


def test_every_field_is_described() -> None:
    assert all(field.description for field in ChainConfig.model_fields.values())
