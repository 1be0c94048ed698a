"""The digest of each datanet version's attribution index (statedir/store_cache.py `directory_digest`).

Indexes may now live in a remote store (`index_path` an fsspec URL); nodes copy them and check the
copy against `index_digest`. Versions published before have NULL: their indexes are not checked.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datanetversion', schema=None) as batch_op:
        batch_op.add_column(sa.Column('index_digest', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datanetversion', schema=None) as batch_op:
        batch_op.drop_column('index_digest')
