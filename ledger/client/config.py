"""What a client of the ledger reads from ``GATEWAY_LEDGER_*``: where the ledger listens, its token, trace shipping.

`ledger.config.LedgerConfig` extends it with the service's own settings (same prefix).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class LedgerClientConfig(BaseSettings):
    """Where the ledger service is, its token, and how traces are queued and shipped to it."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_LEDGER_")

    host: str = Field("127.0.0.1", description="Address `gateway ledger serve` binds.")
    port: int = Field(50051, ge=1, le=65535, description="Port of the ledger's gRPC API.")
    address: str | None = Field(None, description="Where the gateway ships traces and the CLI asks (host:port); "
                                "default host:port above.")
    token: SecretStr | None = Field(None, description="Bearer token of the ledger's API, required on every call "
                                    "(health checks excepted). Unset: the ledger service generates one into "
                                    "<state>/ledger-token (owner-only) and its clients read it from there "
                                    "(ledger/client/token.py).")
    token_file: Path | None = Field(None, description="A file holding the token (e.g. a mounted secret), read "
                                    "instead of <state>/ledger-token and never written; for processes that do not "
                                    "share the ledger's state directory (docs/deployment.md).")
    outbox_max_traces: PositiveInt = Field(100_000, description="Traces the gateway's outbox holds before it "
                                           "refuses new inferences (503) until the ledger catches up.")
    ship_batch: PositiveInt = Field(64, description="Traces per message on the ingest stream.")
    ship: bool = Field(True, description="Queue every trace for the ledger (off only to measure shipping's cost: "
                       "inferences are then not billed).")
    usage_records: bool = Field(True, description="Make each response's usage record durable before its last "
                                "byte (off only to measure its cost: a replica that dies then loses the bills of "
                                "responses whose attribution had not finished).")

    @model_validator(mode="after")
    def _one_token_source(self) -> "LedgerClientConfig":
        if self.token_value() is not None and self.token_file is not None:
            raise ValueError("set the ledger token or token_file, not both")
        return self

    @property
    def target(self) -> str:
        return self.address or f"{self.host}:{self.port}"

    def token_value(self) -> str | None:
        """GATEWAY_LEDGER_TOKEN as set (None when unset or empty). Use `ledger.client.token.read_ledger_token`,
        which checks it and falls back to the file."""
        return (self.token.get_secret_value() or None) if self.token is not None else None
