"""Tables of the datanet and adapter registry: datanets, their versions and contributions, adapters and lineage.

Guarantees (asserted in code and tests):
- a contribution's id is the SHA-256 of its normalized text, so the same text exists at most once
  in the whole registry (any datanet, any version);
- a contribution's contributor is the address recovered from its signature, never a claimed one;
- a published version is frozen: its contribution set, Merkle root and index never change;
  versions are cumulative (version n holds every contribution published in versions 1..n);
- an adapter's lineage names published datanet versions only;
- a version's index is its `index_digest` (statedir/store_cache.py): nodes refuse a copy that differs;
- a stored rejection names a contributor proven by a valid signature and never holds the rejected text.
Times are timezone-aware UTC. The schema is created and upgraded by Alembic (storage/migrations/).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, LargeBinary, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from storage.database import utcnow


class Datanet(SQLModel, table=True):
    """A community dataset. `id` is a random UUID (hex), the key contributors sign over."""

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(sa_column=Column(String(64), unique=True, nullable=False, index=True))
    owner: str | None = Field(default=None, max_length=42)
    description: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(default_factory=utcnow)


class DatanetVersion(SQLModel, table=True):
    """A published, frozen snapshot of a datanet, anchored on-chain by its Merkle root."""

    __table_args__ = (UniqueConstraint("datanet_id", "number"),)

    id: int | None = Field(default=None, primary_key=True)
    datanet_id: str = Field(foreign_key="datanet.id", index=True, max_length=32)
    number: int
    merkle_root: str = Field(max_length=66)
    contribution_count: int
    index_path: str = Field(sa_column=Column(Text, nullable=False))  # a local directory or a store URL (s3://…)
    index_digest: str | None = Field(default=None, max_length=80)  # sha256:<hex> of the index; None: not checked
    anchor_tx: str | None = Field(default=None, max_length=66)
    anchor_chain_id: int | None = None
    anchor_contract: str | None = Field(default=None, max_length=42)
    published_at: datetime = Field(default_factory=utcnow)


class Contribution(SQLModel, table=True):
    """One signed text contribution; `version` is the first version that published it."""

    id: str = Field(primary_key=True, max_length=64)
    datanet_id: str = Field(foreign_key="datanet.id", index=True, max_length=32)
    contributor: str = Field(index=True, max_length=42)
    signature: str = Field(max_length=132)
    license: str = Field(max_length=64)
    bytes: int
    text: str = Field(sa_column=Column(Text, nullable=False))
    minhash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending | published
    version: int | None = None
    source: str = Field(default="", max_length=255)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class ContributionBand(SQLModel, table=True):
    """Locality-sensitive hash buckets of a contribution's MinHash, for near-duplicate look-up."""

    key: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    contribution_id: str = Field(foreign_key="contribution.id", primary_key=True, max_length=64)


class ContributionRejection(SQLModel, table=True):
    """A submitted text refused after its signature verified (duplicate, near-duplicate, daily limit).

    `contributor` is the address recovered from the signature, `content_id` the SHA-256 of the
    normalized text; the text itself is not kept. Items refused before their signature verified
    (empty, too large, bad address or signature) have no proven submitter and are never stored.
    """

    __table_args__ = (Index("ix_contributionrejection_datanet_id_created_at", "datanet_id", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    datanet_id: str = Field(foreign_key="datanet.id", max_length=32)
    contributor: str = Field(index=True, max_length=42)
    content_id: str = Field(max_length=64)
    source: str = Field(default="", max_length=255)
    reason: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Adapter(SQLModel, table=True):
    """A LoRA adapter servable by the gateway, its owner and its price (token base units per 1k tokens)."""

    name: str = Field(primary_key=True, max_length=128)
    base_model: str = Field(max_length=128)
    uri: str = Field(sa_column=Column(Text, nullable=False))
    owner: str = Field(max_length=42)
    price_per_1k_tokens: str = Field(max_length=80)  # decimal digits: base units exceed 64 bits
    source: str = Field(max_length=16)  # trained | registered
    created_at: datetime = Field(default_factory=utcnow)


class AdapterLineage(SQLModel, table=True):
    """Adapter ← the published datanet versions it learned from."""

    adapter_name: str = Field(foreign_key="adapter.name", primary_key=True, max_length=128)
    datanet_version_id: int = Field(foreign_key="datanetversion.id", primary_key=True)
