"""The shared database of the registry and the ledger: SQLite in the state directory by default, any
SQLAlchemy URL via DATABASE_URL.

SQLite runs in WAL mode with foreign keys on and a busy timeout, so the CLI, the gateway and the
ledger service can share one file. PostgreSQL is selected with e.g.
``DATABASE_URL=postgresql+psycopg://user@host/db`` (``postgresql://`` is accepted and mapped to the
psycopg 3 driver).
"""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, event
from sqlmodel import create_engine

from statedir.layout import StateLayout
from storage.amounts import ExactSumAggregate

SQLITE_BUSY_TIMEOUT_MS = 30_000


def utcnow() -> datetime:
    """Now, timezone-aware UTC: every time stored in the database is (SQLite keeps no zone)."""
    return datetime.now(UTC)


def database_url(state_dir: Path) -> str:
    """`DATABASE_URL` from the environment, else the SQLite file in the state directory."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        return f"sqlite:///{StateLayout(Path(state_dir).resolve()).database}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_database(url: str, *, migrate: bool = True) -> Engine:
    """An engine for `url`, its schema brought to the newest migration (idempotent, cheap when current)."""
    from storage.migrate import upgrade  # deferred: Alembic adds ~0.2 s to every CLI start; opening a database needs it

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if migrate:
        upgrade(engine)
    return engine


def _set_wal(cursor: sqlite3.Cursor) -> None:
    """Switch to WAL. The switch can answer "locked" at once, without waiting like other statements,
    while another process opens or migrates the same new file: wait for it as a busy statement would."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _set_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    connection.create_aggregate("exact_sum", 1, ExactSumAggregate)
