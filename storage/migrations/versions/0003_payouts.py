"""Payout batches, their lines and their signed transactions (the settler's persisted state machine).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from storage.amounts import Amount

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payoutbatch",
        sa.Column("id", AutoString(length=66), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("manifest_hash", AutoString(length=66), nullable=False),
        sa.Column("payee_count", sa.Integer(), nullable=False),
        sa.Column("total", Amount(), nullable=False),
        sa.Column("chain_id", sa.Integer(), nullable=False),
        sa.Column("settler", AutoString(length=42), nullable=False),
        sa.Column("operator", AutoString(length=42), nullable=False),
        sa.Column("nonce", sa.Integer(), nullable=True),
        sa.Column("tx_hash", AutoString(length=66), nullable=True),
        sa.Column("block_number", sa.Integer(), nullable=True),
        sa.Column("block_hash", AutoString(length=66), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_payoutbatch_state", "payoutbatch", ["state"])
    op.create_table(
        "payoutline",
        sa.Column("batch_id", AutoString(length=66), nullable=False),
        sa.Column("address", AutoString(length=42), nullable=False),
        sa.Column("amount", Amount(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["payoutbatch.id"]),
        sa.PrimaryKeyConstraint("batch_id", "address"),
    )
    op.create_table(
        "payoutattempt",
        sa.Column("tx_hash", AutoString(length=66), nullable=False),
        sa.Column("batch_id", AutoString(length=66), nullable=False),
        sa.Column("nonce", sa.Integer(), nullable=False),
        sa.Column("gas", sa.Integer(), nullable=False),
        sa.Column("max_fee_per_gas", Amount(), nullable=False),
        sa.Column("max_priority_fee_per_gas", Amount(), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["payoutbatch.id"]),
        sa.PrimaryKeyConstraint("tx_hash"),
    )
    op.create_index("ix_payoutattempt_batch_id", "payoutattempt", ["batch_id"])


def downgrade() -> None:
    for table in ("payoutattempt", "payoutline", "payoutbatch"):
        op.drop_table(table)
