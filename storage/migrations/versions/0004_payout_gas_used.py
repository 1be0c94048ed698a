"""Gas used by a payout batch's mined transaction (for the settlement metrics).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("payoutbatch") as batch:
        batch.add_column(sa.Column("gas_used", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("payoutbatch") as batch:
        batch.drop_column("gas_used")
