"""Tables of the ledger's database: datanets, their versions and contributions, adapters and lineage.

Guarantees (asserted in code and tests):
- a contribution's id is the SHA-256 of its normalized text, so the same text exists at most once
  in the whole ledger (any datanet, any version);
- a contribution's contributor is the address recovered from its signature, never a claimed one;
- a published version is frozen: its contribution set, Merkle root and index never change;
  versions are cumulative (version n holds every contribution published in versions 1..n);
- an adapter's lineage names published datanet versions only;
- a trace id is ingested at most once; each ingested trace has exactly one journal entry whose
  postings sum to zero (ledger/journal.py); amounts are exact integers (ledger/amounts.py).
Times are timezone-aware UTC. The schema is created and upgraded by Alembic (ledger/migrations/).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel
from sqlmodel.sql.sqltypes import UTCDateTime  # aware in, UTC out (SQLite keeps no zone): like plain `datetime` fields

from ledger.amounts import Amount


# 64-bit ids on PostgreSQL; SQLite auto-increments only an INTEGER PRIMARY KEY (also 64-bit there).
BIG_ID = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


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
    index_path: str = Field(sa_column=Column(Text, nullable=False))
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


class IngestedTrace(SQLModel, table=True):
    """An attribution trace the ledger accepted, with the fee it was charged (exactly one entry)."""

    trace_id: str = Field(primary_key=True, max_length=128)
    content_sha256: str = Field(max_length=64)
    model: str = Field(max_length=128)
    adapter: str | None = Field(default=None, max_length=128, index=True)
    requester: str | None = Field(default=None, max_length=128)
    prompt_tokens: int
    completion_tokens: int
    attributed_tokens: float = Field(sa_column=Column(Float, nullable=False))
    price_per_1k_tokens: int = Field(sa_column=Column(Amount, nullable=False))
    fee: int = Field(sa_column=Column(Amount, nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON (attribution/trace_wire.py)
    entry_id: int = Field(sa_column=Column(BigInteger, ForeignKey("journalentry.id"), nullable=False, unique=True))
    received_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class TraceConflict(SQLModel, table=True):
    """A trace refused because its id was already ingested with different content (kept for inspection)."""

    id: int | None = Field(default=None, primary_key=True)
    trace_id: str = Field(max_length=128, index=True)
    content_sha256: str = Field(max_length=64)
    body: str = Field(sa_column=Column(Text, nullable=False))
    received_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class JournalEntry(SQLModel, table=True):
    """One balanced accounting event; `(kind, ref)` is unique (ref = trace id for an inference)."""

    __table_args__ = (UniqueConstraint("kind", "ref"),)

    id: int | None = Field(default=None, sa_column=Column(BIG_ID, primary_key=True, autoincrement=True))
    kind: str = Field(max_length=32)
    ref: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class Posting(SQLModel, table=True):
    """One line of a journal entry: a signed amount on an account (credits positive)."""

    __table_args__ = (Index("ix_posting_account_entry", "account", "entry_id"),)

    id: int | None = Field(default=None, sa_column=Column(BIG_ID, primary_key=True, autoincrement=True))
    entry_id: int = Field(sa_column=Column(BigInteger, ForeignKey("journalentry.id"), nullable=False, index=True))
    account: str = Field(max_length=64)
    role: str = Field(max_length=16)
    amount: int = Field(sa_column=Column(Amount, nullable=False))


class PayoutBatch(SQLModel, table=True):
    """One on-chain payout transaction's worth of payees, driven through its states by the settler.

    planned → signed → sent → confirmed → paid, or voided. Each state is written before the
    external action it allows (ledger/settler.py). `id` is the batch id the contract records (0x + 64 hex).
    """

    id: str = Field(primary_key=True, max_length=66)
    state: str = Field(max_length=16, index=True)
    manifest_hash: str = Field(max_length=66)
    payee_count: int
    total: int = Field(sa_column=Column(Amount, nullable=False))
    chain_id: int
    settler: str = Field(max_length=42)
    operator: str = Field(max_length=42)
    nonce: int | None = None
    tx_hash: str | None = Field(default=None, max_length=66)  # the attempt that was mined (or the latest)
    block_number: int | None = None
    block_hash: str | None = Field(default=None, max_length=66)
    gas_used: int | None = None  # of the mined transaction, from its receipt
    reason: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class PayoutLine(SQLModel, table=True):
    """A payee of a batch and the amount it is paid (base units)."""

    batch_id: str = Field(foreign_key="payoutbatch.id", primary_key=True, max_length=66)
    address: str = Field(primary_key=True, max_length=42)
    amount: int = Field(sa_column=Column(Amount, nullable=False))


class PayoutAttempt(SQLModel, table=True):
    """A signed settle transaction of a batch, stored before it is sent (a fee bump adds another)."""

    tx_hash: str = Field(primary_key=True, max_length=66)
    batch_id: str = Field(foreign_key="payoutbatch.id", index=True, max_length=66)
    nonce: int
    gas: int
    max_fee_per_gas: int = Field(sa_column=Column(Amount, nullable=False))
    max_priority_fee_per_gas: int = Field(sa_column=Column(Amount, nullable=False))
    raw: str = Field(sa_column=Column(Text, nullable=False))
    sent_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class RequesterAccount(SQLModel, table=True):
    """Who pays for inferences: a prepaid balance (journal account `requester:<id>`) and its API keys.

    `balance` and `held` are kept in step with the journal and the holds in the same transactions
    (the invariants are checked by `Accounts.check`), so admission reads one row instead of summing
    postings. `deposit_address` is the chain address whose transfers to the treasury credit it.
    """

    id: str = Field(primary_key=True, max_length=48)
    deposit_address: str | None = Field(default=None, max_length=42, unique=True)
    balance: int = Field(default=0, sa_column=Column(Amount, nullable=False))  # = sum of its postings
    held: int = Field(default=0, sa_column=Column(Amount, nullable=False))  # = sum of its holds
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class ApiKey(SQLModel, table=True):
    """An API key of an account: only the SHA-256 of its secret is stored; revoked keys are kept."""

    id: str = Field(primary_key=True, max_length=32)
    account_id: str = Field(foreign_key="requesteraccount.id", index=True, max_length=48)
    secret_sha256: str = Field(max_length=64)
    name: str = Field(default="", max_length=64)
    admin: bool = False
    requests_per_second: float | None = None  # None: the gateway's default limit
    tokens_per_minute: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class BalanceHold(SQLModel, table=True):
    """Worst-case cost of an inference in flight, reserved on its account until the ledger posts its trace."""

    trace_id: str = Field(primary_key=True, max_length=128)
    account_id: str = Field(foreign_key="requesteraccount.id", index=True, max_length=48)
    amount: int = Field(sa_column=Column(Amount, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class AdapterAccess(SQLModel, table=True):
    """A private adapter and an account allowed to use it (an adapter with no rows is public)."""

    adapter_name: str = Field(foreign_key="adapter.name", primary_key=True, max_length=128)
    account_id: str = Field(foreign_key="requesteraccount.id", primary_key=True, max_length=48)


class DepositScan(SQLModel, table=True):
    """How far the deposit watcher has credited transfers of `token` to `treasury` on a chain."""

    chain_id: int = Field(primary_key=True)
    token: str = Field(primary_key=True, max_length=42)
    treasury: str = Field(primary_key=True, max_length=42)
    next_block: int
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class Deposit(SQLModel, table=True):
    """A token transfer to the treasury seen at the confirmation depth; credited once (entry `deposit`, ref = id).

    `id` is `<chain id>:<tx hash>:<log index>`. A transfer from an address no account claims is kept
    with `account_id` None and no entry, for the operator to resolve.
    """

    id: str = Field(primary_key=True, max_length=128)
    account_id: str | None = Field(default=None, foreign_key="requesteraccount.id", index=True, max_length=48)
    from_address: str = Field(max_length=42)
    amount: int = Field(sa_column=Column(Amount, nullable=False))
    block_number: int
    block_hash: str = Field(max_length=66)
    tx_hash: str = Field(max_length=66)
    entry_id: int | None = Field(default=None, sa_column=Column(BigInteger, ForeignKey("journalentry.id"),
                                                                nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
