"""Tables of the ledger: ingested traces, the journal, payouts, requester accounts, keys, holds and deposits.

Guarantees (asserted in code and tests):
- a trace id is ingested at most once; each ingested trace has exactly one journal entry whose
  postings sum to zero (ledger/journal/journal.py); amounts are exact integers (storage/amounts.py).
The registry's tables (datanets, contributions, adapters) are in registry/models.py; foreign keys
name them by table. Times are timezone-aware UTC. The schema is created and upgraded by Alembic
(storage/migrations/).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel
from sqlmodel.sql.sqltypes import UTCDateTime  # aware in, UTC out (SQLite keeps no zone): like plain `datetime` fields

import registry.models  # noqa: F401  (AdapterAccess's foreign key names the registry's adapter table)
from storage.amounts import Amount
from storage.database import utcnow

# 64-bit ids on PostgreSQL; SQLite auto-increments only an INTEGER PRIMARY KEY (also 64-bit there).
BIG_ID = BigInteger().with_variant(Integer, "sqlite")


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
    body: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON (ledger/client/trace_wire.py)
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
    external action it allows (ledger/settlement/settler.py). `id` is the batch id the contract records (0x + 64 hex).
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


class Transfer(SQLModel, table=True):
    """A two-phase transfer on a requester account: a lease of credit to an engine replica, or a
    request's hold; pending until posted, voided or expired (ledger/accounts/transfers.py).

    `amount` is what it reserved when created (a lease: what was granted of `requested`), `drawn`
    how much of a lease holds have taken, `posted` what was finally charged (a lease: what its holds
    had drawn when it was closed). `lease_id` names the lease a hold is drawn from; `under_lease` the
    lease a hold was reported under (also when it could not be drawn from it), and `overdraw` how far
    that hold took the account's available credit below zero. `created_by` is the operation that
    made the row (`lease`, `hold`, or `post`: the trace arrived before the hold report); `late`
    marks a hold posted after it expired.
    """

    __table_args__ = (Index("ix_transfer_state_expires_at", "state", "expires_at"),)

    id: str = Field(primary_key=True, max_length=128)
    kind: str = Field(max_length=8)
    account_id: str = Field(foreign_key="requesteraccount.id", index=True, max_length=48)
    lease_id: str | None = Field(default=None, foreign_key="transfer.id", index=True, max_length=128)
    under_lease: str | None = Field(default=None, max_length=128)
    requested: int = Field(sa_column=Column(Amount, nullable=False))
    amount: int = Field(sa_column=Column(Amount, nullable=False))
    drawn: int = Field(default=0, sa_column=Column(Amount, nullable=False))
    posted: int = Field(default=0, sa_column=Column(Amount, nullable=False))
    overdraw: int = Field(default=0, sa_column=Column(Amount, nullable=False))
    state: str = Field(max_length=8)
    created_by: str = Field(max_length=8)
    late: bool = False
    owner: str = Field(default="", max_length=128)
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    resolved_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
