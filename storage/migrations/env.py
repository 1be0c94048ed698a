"""Alembic environment: runs on the connection `storage.migrate.upgrade` passes in (no alembic.ini).

The tables compared by autogenerate are those registered on SQLModel.metadata by the model modules
the caller imported (`ledger.schema` imports them all); upgrading needs none of them.
"""

from alembic import context
from sqlmodel import SQLModel

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=SQLModel.metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
