"""Typed settings of the chain connection (env prefix ``GATEWAY_CHAIN_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.chain.anvil import ANVIL_DEV_KEYS
from ledger.chain.errors import ChainConfigError


class ChainConfig(BaseSettings):
    """Where roots and payouts go on-chain, and with which operator key."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_CHAIN_")

    rpc_url: str | None = Field(
        None,
        description="JSON-RPC URL of the chain. Unset: the local anvil node of the state directory "
        "(started when nothing answers on `port`).",
    )
    port: int = Field(8545, ge=1, le=65535, description="Port of the local anvil node on 127.0.0.1.")
    chain_id: PositiveInt = Field(31337, description="Chain id of the local anvil node.")
    operator_key: SecretStr | None = Field(
        None,
        description="Private key (hex) of the operator account that deploys the contracts and sends "
        "anchors and payouts. Prefer operator_key_file outside local development.",
    )
    operator_key_file: Path | None = Field(
        None, description="File holding the operator's private key (hex, surrounding whitespace ignored)."
    )

    @field_validator("rpc_url")
    @classmethod
    def _empty_url_is_local(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return value.strip()

    @model_validator(mode="after")
    def _one_key_source(self) -> ChainConfig:
        if self.operator_key is not None and self.operator_key_file is not None:
            raise ValueError("set operator_key or operator_key_file, not both")
        return self

    @property
    def uses_local_node(self) -> bool:
        """True when no rpc_url is set, i.e. the chain is the local anvil."""
        return self.rpc_url is None

    def private_key(self, local: bool | None = None) -> str:
        """The operator key (0x hex). Falls back to anvil's dev key 0 only on the local chain.

        `local` defaults to `uses_local_node`. Raises ChainConfigError when a remote chain has no key
        or the key file cannot be read; the key itself never appears in a message.
        """
        local = self.uses_local_node if local is None else local
        if self.operator_key is not None:
            key = self.operator_key.get_secret_value().strip()
        elif self.operator_key_file is not None:
            try:
                key = self.operator_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ChainConfigError(
                    f"cannot read the operator key file {self.operator_key_file}: {exc.strerror}"
                ) from None
        elif local:
            return ANVIL_DEV_KEYS[0]
        else:
            raise ChainConfigError(
                "a remote chain needs an operator key: set GATEWAY_CHAIN_OPERATOR_KEY_FILE "
                "(or GATEWAY_CHAIN_OPERATOR_KEY)"
            )
        body = key.removeprefix("0x")
        if len(body) != 64 or any(c not in "0123456789abcdefABCDEF" for c in body):
            raise ChainConfigError("the operator key must be 32 bytes of hex (64 digits, optional 0x)")
        return "0x" + body.lower()
