"""Rejections of contributions whose submitter is proven (registry/models.py `ContributionRejection`).

A row per item refused after its signature verified: exact duplicate, near-duplicate, over the
daily limit. Items refused before (empty, too large, bad address or signature) are not recorded.
The rejected text is not stored, only its content id. Existing databases start with no rows.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contributionrejection",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("datanet_id", AutoString(length=32), nullable=False),
        sa.Column("contributor", AutoString(length=42), nullable=False),
        sa.Column("content_id", AutoString(length=64), nullable=False),
        sa.Column("source", AutoString(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["datanet_id"], ["datanet.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("contributionrejection", schema=None) as batch_op:
        batch_op.create_index("ix_contributionrejection_contributor", ["contributor"], unique=False)
        batch_op.create_index("ix_contributionrejection_datanet_id_created_at", ["datanet_id", "created_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("contributionrejection", schema=None) as batch_op:
        batch_op.drop_index("ix_contributionrejection_datanet_id_created_at")
        batch_op.drop_index("ix_contributionrejection_contributor")
    op.drop_table("contributionrejection")
