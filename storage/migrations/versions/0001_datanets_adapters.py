"""Datanets, versions, contributions, adapters and lineage (the schema of issue 4, made by create_all).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter",
        sa.Column("name", AutoString(length=128), nullable=False),
        sa.Column("base_model", AutoString(length=128), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("owner", AutoString(length=42), nullable=False),
        sa.Column("price_per_1k_tokens", AutoString(length=80), nullable=False),
        sa.Column("source", AutoString(length=16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "datanet",
        sa.Column("id", AutoString(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", AutoString(length=42), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_datanet_name", "datanet", ["name"], unique=True)
    op.create_table(
        "contribution",
        sa.Column("id", AutoString(length=64), nullable=False),
        sa.Column("datanet_id", AutoString(length=32), nullable=False),
        sa.Column("contributor", AutoString(length=42), nullable=False),
        sa.Column("signature", AutoString(length=132), nullable=False),
        sa.Column("license", AutoString(length=64), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("minhash", sa.LargeBinary(), nullable=False),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("source", AutoString(length=255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["datanet_id"], ["datanet.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_contribution_contributor", "contribution", ["contributor"])
    op.create_index("ix_contribution_created_at", "contribution", ["created_at"])
    op.create_index("ix_contribution_datanet_id", "contribution", ["datanet_id"])
    op.create_table(
        "datanetversion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("datanet_id", AutoString(length=32), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("merkle_root", AutoString(length=66), nullable=False),
        sa.Column("contribution_count", sa.Integer(), nullable=False),
        sa.Column("index_path", sa.Text(), nullable=False),
        sa.Column("anchor_tx", AutoString(length=66), nullable=True),
        sa.Column("anchor_chain_id", sa.Integer(), nullable=True),
        sa.Column("anchor_contract", AutoString(length=42), nullable=True),
        sa.Column("published_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["datanet_id"], ["datanet.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("datanet_id", "number"),
    )
    op.create_index("ix_datanetversion_datanet_id", "datanetversion", ["datanet_id"])
    op.create_table(
        "adapterlineage",
        sa.Column("adapter_name", AutoString(length=128), nullable=False),
        sa.Column("datanet_version_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["adapter_name"], ["adapter.name"]),
        sa.ForeignKeyConstraint(["datanet_version_id"], ["datanetversion.id"]),
        sa.PrimaryKeyConstraint("adapter_name", "datanet_version_id"),
    )
    op.create_table(
        "contributionband",
        sa.Column("key", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("contribution_id", AutoString(length=64), nullable=False),
        sa.ForeignKeyConstraint(["contribution_id"], ["contribution.id"]),
        sa.PrimaryKeyConstraint("key", "contribution_id"),
    )


def downgrade() -> None:
    for table in ("contributionband", "adapterlineage", "datanetversion", "contribution", "datanet", "adapter"):
        op.drop_table(table)
