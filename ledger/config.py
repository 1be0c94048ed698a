"""Typed settings of the datanet registry (``GATEWAY_DATANET_``) and the ledger service (``GATEWAY_LEDGER_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.fee_split import FeeSplitPolicy


class DatanetConfig(BaseSettings):
    """Limits that keep contributions honest; every field can be set by env."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_DATANET_")

    max_contribution_bytes: PositiveInt = Field(
        64 * 1024, description="Largest contribution (UTF-8 bytes after normalization)."
    )
    max_bytes_per_contributor_per_day: PositiveInt = Field(
        16 * 1024 * 1024, description="Bytes one contributor may add per UTC day, over all datanets."
    )
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="Word-3-gram Jaccard similarity at or above which a text is a near-duplicate."
    )
    default_license: str = Field("CC-BY-4.0", description="License recorded when the contributor names none.")


class LedgerConfig(BaseSettings):
    """The ledger service, the fee split and trace shipping (env prefix ``GATEWAY_LEDGER_``)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_LEDGER_")

    host: str = Field("127.0.0.1", description="Address `gateway ledger serve` binds.")
    port: int = Field(50051, ge=1, le=65535, description="Port of the ledger's gRPC API.")
    metrics_port: int = Field(9401, ge=0, le=65535, description="Prometheus scrape port of the ledger service "
                              "(/metrics; a free port when taken or 0, announced in <state>/monitoring/targets/).")
    address: str | None = Field(None, description="Where the gateway ships traces and the CLI asks (host:port); "
                                "default host:port above.")
    token: SecretStr | None = Field(None, description="Bearer token of the ledger's API, required on every call "
                                    "(health checks excepted). Unset: the ledger service generates one into "
                                    "<state>/ledger-token (owner-only) and its clients read it from there "
                                    "(ledger/ledger_token.py).")
    start: bool = Field(True, description="`gateway up` starts the ledger service unless one answers already.")
    contributors_bps: int = Field(7000, ge=0, le=10_000, description="Contributors' part of each fee (basis points).")
    owner_bps: int = Field(2000, ge=0, le=10_000, description="Adapter owner's part of each fee (basis points); "
                           "the treasury gets the rest and every rounding remainder.")
    unattributed: Literal["lineage_pro_rata", "treasury"] = Field(
        "lineage_pro_rata", description="Who gets the contributors' part of unattributed tokens.")
    outbox_max_traces: PositiveInt = Field(100_000, description="Traces the gateway's outbox holds before it "
                                           "refuses new inferences (503) until the ledger catches up.")
    ship_batch: PositiveInt = Field(64, description="Traces per message on the ingest stream.")
    ship: bool = Field(True, description="Queue every trace for the ledger (off only to measure shipping's cost: "
                       "inferences are then not billed).")
    usage_records: bool = Field(True, description="Make each response's usage record durable before its last "
                                "byte (off only to measure its cost: a replica that dies then loses the bills of "
                                "responses whose attribution had not finished).")

    @model_validator(mode="after")
    def _split_fits(self) -> "LedgerConfig":
        if self.contributors_bps + self.owner_bps > 10_000:
            raise ValueError("contributors_bps + owner_bps must be <= 10000 (the treasury gets the rest)")
        return self

    @property
    def target(self) -> str:
        return self.address or f"{self.host}:{self.port}"

    def token_value(self) -> str | None:
        """GATEWAY_LEDGER_TOKEN as set (None when unset or empty). Use `ledger.ledger_token.read_ledger_token`,
        which checks it and falls back to the file."""
        return (self.token.get_secret_value() or None) if self.token is not None else None

    def fee_split(self) -> FeeSplitPolicy:
        return FeeSplitPolicy(self.contributors_bps, self.owner_bps, self.unattributed)


class SettlementConfig(BaseSettings):
    """On-chain payouts (env prefix ``GATEWAY_SETTLE_``); chain and operator key are `ChainConfig`'s."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_SETTLE_")

    threshold: PositiveInt = Field(10**16, description="Pay an address once its payable balance reaches this "
                                   "(base units; default 0.01 token).")
    max_payees: int = Field(400, ge=1, le=400, description="Payees per transaction.")
    confirmations: PositiveInt = Field(2, description="Blocks deep a payout transaction must be to count as paid.")
    stuck_after_seconds: float = Field(30.0, gt=0, description="Re-sign with higher fees after this long unmined.")
    fee_bump_percent: int = Field(25, ge=10, description="Fee increase of a re-signed transaction (nodes need >= 10).")
    interval_seconds: float = Field(60.0, gt=0, description="How often `gateway up` runs a settlement round.")
    periodic: bool = Field(True, description="`gateway up` runs the settler every interval.")
    token: str | None = Field(None, description="Payout token address on a remote chain (local: deployed).")
    settler: str | None = Field(None, description="PayoutSettler address on a remote chain (local: deployed).")
    local_funding: int = Field(10**24, ge=0, description="Tokens minted to the local settler when it is deployed.")
    pause_after: Literal["planned", "signed", "sent", "confirmed"] | None = Field(
        None, description="Test hook, off by default: `gateway settle` blocks (until killed) once a batch's state "
        "becomes this one, so crash tests can SIGKILL it exactly there.")


class DepositConfig(BaseSettings):
    """Watching the chain for payout-token transfers to the treasury (the PayoutSettler) that fund accounts."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_DEPOSITS_", extra="ignore")

    watch: bool = Field(True, description="`gateway up` credits deposits to the accounts whose deposit address "
                        "sent them.")
    confirmations: PositiveInt = Field(2, description="Blocks deep a transfer must be before it is credited.")
    interval_seconds: float = Field(5.0, gt=0, description="How often the chain is scanned for new deposits.")
    start_block: int = Field(0, ge=0, description="First block to scan (the settler's deployment block on a "
                             "remote chain).")
