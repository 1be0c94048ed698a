"""The journal: ingested traces, refused conflicting traces, journal entries and postings.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from storage.amounts import Amount

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "journalentry",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("kind", AutoString(length=32), nullable=False),
        sa.Column("ref", AutoString(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "ref"),
    )
    op.create_table(
        "posting",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("role", AutoString(length=16), nullable=False),
        sa.Column("amount", Amount(), nullable=False),
        sa.ForeignKeyConstraint(["entry_id"], ["journalentry.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_posting_account_entry", "posting", ["account", "entry_id"])
    op.create_index("ix_posting_entry_id", "posting", ["entry_id"])
    op.create_table(
        "ingestedtrace",
        sa.Column("trace_id", AutoString(length=128), nullable=False),
        sa.Column("content_sha256", AutoString(length=64), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("adapter", AutoString(length=128), nullable=True),
        sa.Column("requester", AutoString(length=128), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("attributed_tokens", sa.Float(), nullable=False),
        sa.Column("price_per_1k_tokens", Amount(), nullable=False),
        sa.Column("fee", Amount(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["entry_id"], ["journalentry.id"]),
        sa.PrimaryKeyConstraint("trace_id"),
        sa.UniqueConstraint("entry_id"),
    )
    op.create_index("ix_ingestedtrace_adapter", "ingestedtrace", ["adapter"])
    op.create_table(
        "traceconflict",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trace_id", AutoString(length=128), nullable=False),
        sa.Column("content_sha256", AutoString(length=64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_traceconflict_trace_id", "traceconflict", ["trace_id"])


def downgrade() -> None:
    for table in ("traceconflict", "ingestedtrace", "posting", "journalentry"):
        op.drop_table(table)
