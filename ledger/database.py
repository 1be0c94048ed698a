"""The ledger's database: SQLite in the state directory by default, any SQLAlchemy URL via DATABASE_URL.

SQLite runs in WAL mode with foreign keys on and a busy timeout, so the CLI, the gateway and the
ledger service can share one file. PostgreSQL is selected with e.g.
``DATABASE_URL=postgresql+psycopg://user@host/db`` (``postgresql://`` is accepted and mapped to the
psycopg 3 driver).
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, event
from sqlmodel import SQLModel, create_engine

DATABASE_FILE = "ledger.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def database_url(state_dir: Path) -> str:
    """`DATABASE_URL` from the environment, else the SQLite file in the state directory."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        return f"sqlite:///{Path(state_dir).resolve() / DATABASE_FILE}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_database(url: str) -> Engine:
    """An engine for `url` with the schema created (idempotent)."""
    from ledger import models  # noqa: F401  (registers the tables)

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    SQLModel.metadata.create_all(engine)
    return engine


def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()
