"""Typed settings of the ledger service (``GATEWAY_LEDGER_``), settlement (``GATEWAY_SETTLE_``) and deposits
(``GATEWAY_DEPOSITS_``); what the ledger's clients read is `ledger.client.config.LedgerClientConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.client.config import LedgerClientConfig
from ledger.journal.fee_split import FeeSplitPolicy


class LedgerConfig(LedgerClientConfig):
    """The ledger service and the fee split, beside what its clients read (env prefix ``GATEWAY_LEDGER_``)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_LEDGER_")

    metrics_port: int = Field(9401, ge=0, le=65535, description="Prometheus scrape port of the ledger service "
                              "(/metrics; a free port when taken or 0, announced in <state>/monitoring/targets/).")
    start: bool = Field(True, description="`gateway up` starts the ledger service unless one answers already.")
    contributors_bps: int = Field(7000, ge=0, le=10_000, description="Contributors' part of each fee (basis points).")
    owner_bps: int = Field(2000, ge=0, le=10_000, description="Adapter owner's part of each fee (basis points); "
                           "the treasury gets the rest and every rounding remainder.")
    unattributed: Literal["lineage_pro_rata", "treasury"] = Field(
        "lineage_pro_rata", description="Who gets the contributors' part of unattributed tokens.")

    @model_validator(mode="after")
    def _split_fits(self) -> "LedgerConfig":
        if self.contributors_bps + self.owner_bps > 10_000:
            raise ValueError("contributors_bps + owner_bps must be <= 10000 (the treasury gets the rest)")
        return self

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

    watch: bool = Field(True, description="The ledger service credits deposits to the accounts whose deposit "
                        "address sent them.")
    confirmations: PositiveInt = Field(2, description="Blocks deep a transfer must be before it is credited.")
    interval_seconds: float = Field(5.0, gt=0, description="How often the chain is scanned for new deposits.")
    start_block: int = Field(0, ge=0, description="First block to scan (the settler's deployment block on a "
                             "remote chain).")
