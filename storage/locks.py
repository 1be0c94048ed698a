"""Named cross-process locks on the shared database: a lock file beside SQLite, an advisory lock on PostgreSQL."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine


@contextmanager
def _file_lock(engine: Engine, name: str) -> Iterator[None]:
    """A lock file beside a SQLite database (`<db>.<name>.lock`) held for the block; no-op elsewhere.

    Used by `exclusive`, which also covers PostgreSQL.
    """
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def exclusive(engine: Engine, name: str) -> Iterator[None]:
    """Hold a named cross-process lock for the block: a lock file for SQLite, an advisory lock on PostgreSQL."""
    if engine.dialect.name != "postgresql":
        with _file_lock(engine, name):
            yield
        return
    key = int.from_bytes(name.encode()[:7].ljust(7, b"\0"), "big")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
        try:
            yield
        finally:
            connection.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
            connection.commit()
