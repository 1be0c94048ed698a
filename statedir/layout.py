"""Every path under the state directory, named once.

The state directory (``GATEWAY_STATE_DIR``, default ``./.gateway/``) holds everything a node keeps:
the database, adapters and models, indexes, the usage log and the outbox, traces, the local chain,
secrets and logs. Code asks a `StateLayout` for a path instead of spelling it, so the directory's
shape is written down here only. Paths are relative when the root is; nothing is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class StateLayout:
    """The paths of one state directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def database(self) -> Path:
        """The SQLite database of the registry and the ledger (unless DATABASE_URL names another)."""
        return self.root / "ledger.db"

    @property
    def adapters(self) -> Path:
        """The default adapter store: one directory per adapter."""
        return self.root / "adapters"

    @property
    def adapter_cache(self) -> Path:
        """Local copies of adapters fetched from a remote store."""
        return self.root / "cache" / "adapters"

    @property
    def index_cache(self) -> Path:
        """Local copies of attribution indexes fetched from a remote index store, by digest (`<hex>/`)."""
        return self.root / "cache" / "indexes"

    @property
    def merkle_cache(self) -> Path:
        """The portal's Merkle trees of published versions, by root (`<root hex>.bin`): derived, rebuilt if lost."""
        return self.root / "cache" / "merkle"

    @property
    def wheel_cache(self) -> Path:
        """Verified wheels the pretrained model is converted from (kept for rebuilds)."""
        return self.root / "cache" / "wheels"

    @property
    def models(self) -> Path:
        """Embedded base models, one directory each."""
        return self.root / "models"

    def model(self, name: str) -> Path:
        """The directory of embedded base model `name`."""
        return self.models / name

    @property
    def traces(self) -> Path:
        """Attribution traces of recent requests, one JSON file each."""
        return self.root / "traces"

    @property
    def outbox(self) -> Path:
        """Traces written durably when an inference completes, until the ledger acknowledges them."""
        return self.root / "outbox"

    @property
    def usage(self) -> Path:
        """Usage records of responses whose traces are not yet in the outbox."""
        return self.outbox / "usage"

    @property
    def indexes(self) -> Path:
        """Attribution indexes of published datanet versions (`<datanet id>/v<n>/`)."""
        return self.root / "indexes"

    @property
    def chain(self) -> Path:
        """The local chain: anvil's saved state and log, and the deployed contracts."""
        return self.root / "chain"

    @property
    def chain_deployment(self) -> Path:
        """Addresses of the contracts deployed on the chain in use."""
        return self.chain / "deployment.json"

    @property
    def anvil_state(self) -> Path:
        """The local chain's state, saved by anvil and loaded at its next start."""
        return self.chain / "anvil-state.json"

    @property
    def anvil_state_backup(self) -> Path:
        """The previous saved state, kept while anvil writes a new one."""
        return self.chain / "anvil-state.json.bak"

    @property
    def anvil_log(self) -> Path:
        return self.chain / "anvil.log"

    @property
    def monitoring_targets(self) -> Path:
        """Prometheus file_sd target files, one per scrape endpoint of this node."""
        return self.root / "monitoring" / "targets"

    @property
    def local_api_key(self) -> Path:
        """The local admin key (owner-only), created at the first start with auth on."""
        return self.root / "local-api-key"

    @property
    def ledger_token(self) -> Path:
        """The ledger API's bearer token (owner-only), written by the ledger service at its first start."""
        return self.root / "ledger-token"

    @property
    def gateway_log(self) -> Path:
        """Output of a `gateway up` started in the background (owner-only)."""
        return self.root / "gateway.log"

    @property
    def tmp(self) -> Path:
        """Scratch space on the state directory's filesystem (e.g. an adapter being trained)."""
        return self.root / "tmp"


class StateDirSettings(BaseSettings):
    """``GATEWAY_STATE_DIR`` alone, for code below the serving layer that has no `ServingConfig` to ask."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    state_dir: Path = Field(Path(".gateway"), description="The node's state directory (as `ServingConfig`).")

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.state_dir)
