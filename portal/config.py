"""Typed settings of the contributor portal (env prefix ``GATEWAY_PORTAL_``)."""

from __future__ import annotations

from pydantic import Field, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict


class PortalConfig(BaseSettings):
    """Where the portal listens, what it links to, how much one page shows."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_PORTAL_", extra="ignore")

    enabled: bool = Field(True, description="`gateway up` serves the portal beside the API.")
    host: str = Field("127.0.0.1", description="Interface the portal binds (loopback unless configured otherwise).")
    port: int = Field(8080, ge=0, le=65535, description="Port of the portal's pages; 0 picks a free one.")
    chain_rpc_url: str = Field(
        "", description="JSON-RPC URL the *browser* reads roots and payout receipts from, shown on every proof so "
                        "anyone can repeat the check. Empty: the local chain (http://127.0.0.1:<chain port>). Give "
                        "a public endpoint here, never one whose URL holds a secret.")
    api_url: str = Field("", description="The OpenAI API the playground forwards to (empty: http://127.0.0.1:<http "
                                         "port>).")
    page_size: PositiveInt = Field(50, le=500, description="Rows per page of contributions and contributors.")
    session_minutes: PositiveInt = Field(60, description="How long a sign-in lasts (sessions are kept in memory).")
    https: bool = Field(False, description="Served behind HTTPS: session cookies get the Secure flag.")
