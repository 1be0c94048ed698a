"""Schema migrations of the shared database with Alembic (scripts in storage/migrations/versions/).

`upgrade(engine)` brings any database to the newest revision and is cheap when it already is there,
so every process that opens the database calls it. Concurrent starts are serialized
(`storage.locks.exclusive`: a file lock beside a SQLite database, an advisory lock on
PostgreSQL). A database created before migrations existed (tables made by `create_all`, matching
revision 0001) is stamped at 0001 and upgraded from there.

New revision after a model change (developers; `ledger.schema` imports every table first):
    .venv/bin/python -m ledger.schema revision "what changed"
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, inspect

from storage.locks import exclusive

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"

logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at INFO


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migration scripts"
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision (no-op when it is there)."""
    head = head_revision()
    with engine.connect() as connection:
        if current_revision(connection) == head:
            return
    with exclusive(engine, "migrate"), engine.begin() as connection:
        config = alembic_config(connection)
        if current_revision(connection) is None and inspect(connection).has_table("datanet"):
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, "head")


def revision(message: str) -> None:
    """Autogenerate a revision against a scratch SQLite database at head. It compares the tables
    registered on SQLModel.metadata: the caller imports every model module first (`ledger.schema`)."""
    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{scratch}/ledger.db")
        upgrade(engine)
        with engine.begin() as connection:
            command.revision(alembic_config(connection), message=message, autogenerate=True)
