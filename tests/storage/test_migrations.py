"""Alembic migrations on SQLite and PostgreSQL: the schema they build is the models', old databases upgrade."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

import ledger.schema  # noqa: F401  (every table on SQLModel.metadata, to compare with the migrations)
from storage.database import open_database
from storage.migrate import alembic_config, current_revision, head_revision


def test_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    engine = open_database(database_url)
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), SQLModel.metadata)
    engine.dispose()
    assert diff == [], "a model changed without a migration: python -m ledger.schema revision '...'"


def test_a_database_made_before_migrations_is_stamped_and_upgraded_keeping_its_rows(database_url: str) -> None:
    # What issue 4's create_all made: revision 0001's tables, no alembic_version table.
    raw = create_engine(database_url)
    with raw.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(text("INSERT INTO datanet (id, name, description, created_at) "
                                "VALUES ('d1', 'rivers', '', '2026-01-01 00:00:00')"))
    raw.dispose()
    engine = open_database(database_url)
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        assert inspect(connection).has_table("posting")
        assert connection.execute(text("SELECT name FROM datanet")).scalars().all() == ["rivers"]
    engine.dispose()


def test_concurrent_first_opens_of_one_sqlite_file_migrate_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with ThreadPoolExecutor(4) as pool:
        engines = list(pool.map(lambda _: open_database(url), range(4)))
    with engines[0].connect() as connection:
        assert current_revision(connection) == head_revision()


def test_0007_adds_an_unchecked_index_digest_to_versions_published_before(database_url: str) -> None:
    raw = create_engine(database_url)
    with raw.begin() as connection:
        command.upgrade(alembic_config(connection), "0006")
        connection.execute(text("INSERT INTO datanet (id, name, description, created_at) "
                                "VALUES ('d1', 'rivers', '', '2026-01-01 00:00:00')"))
        connection.execute(text("INSERT INTO datanetversion (datanet_id, number, merkle_root, contribution_count, "
                                "index_path, published_at) VALUES ('d1', 1, '0x00', 3, '/indexes/d1/v1', "
                                "'2026-01-01 00:00:00')"))
    raw.dispose()
    engine = open_database(database_url)
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        rows = connection.execute(text("SELECT index_path, index_digest FROM datanetversion")).all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [("/indexes/d1/v1", None)]


def test_0008_adds_an_empty_rejection_table_and_its_downgrade_removes_it(database_url: str) -> None:
    raw = create_engine(database_url)
    with raw.begin() as connection:
        command.upgrade(alembic_config(connection), "0007")
        connection.execute(text("INSERT INTO datanet (id, name, description, created_at) "
                                "VALUES ('d1', 'rivers', '', '2026-01-01 00:00:00')"))
    raw.dispose()
    engine = open_database(database_url)
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision() == "0008"
        assert connection.execute(text("SELECT count(*) FROM contributionrejection")).scalar() == 0
        indexes = {i["name"] for i in inspect(connection).get_indexes("contributionrejection")}
    engine.dispose()
    assert {"ix_contributionrejection_contributor", "ix_contributionrejection_datanet_id_created_at"} <= indexes
    raw = create_engine(database_url)
    with raw.begin() as connection:
        command.downgrade(alembic_config(connection), "0007")
        assert not inspect(connection).has_table("contributionrejection")
        assert connection.execute(text("SELECT name FROM datanet")).scalars().all() == ["rivers"]
    raw.dispose()
