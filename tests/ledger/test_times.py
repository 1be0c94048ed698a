"""Times in the ledger are UTC and come back timezone-aware from both backends (SQLite keeps no zone)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import StatementError
from sqlmodel import Session, select

from ledger.models import ApiKey, RequesterAccount
from registry.models import Datanet
from storage.database import open_database

BERLIN_SUMMER = timezone(timedelta(hours=2))
MOMENT = datetime(2026, 7, 1, 14, 30, 5, 123456, tzinfo=BERLIN_SUMMER)


def test_times_are_stored_as_utc_and_read_back_aware(database_url: str) -> None:
    engine = open_database(database_url)
    with Session(engine) as session:
        session.add(Datanet(id="d" * 32, name="rivers", created_at=MOMENT))
        session.add(RequesterAccount(id="acme"))
        session.commit()
        session.add(ApiKey(id="k" * 12, account_id="acme", secret_sha256="0" * 64, created_at=MOMENT,
                           revoked_at=datetime(2026, 7, 1, 12, 31, tzinfo=UTC)))
        session.commit()
    engine.dispose()

    with Session(open_database(database_url)) as session:
        datanet = session.exec(select(Datanet)).one()
        key = session.exec(select(ApiKey)).one()
    for read in (datanet.created_at, key.created_at):
        assert read.utcoffset() == timedelta(0) and read == MOMENT and read.hour == 12, "the same instant, in UTC"
    assert key.revoked_at.isoformat() == "2026-07-01T12:31:00+00:00"


def test_a_time_without_a_zone_is_refused_and_nothing_is_written(database_url: str) -> None:
    engine = open_database(database_url)
    with Session(engine) as session:
        session.add(RequesterAccount(id="acme", created_at=datetime(2026, 7, 1, 12, 31)))
        with pytest.raises(StatementError, match="timezone"):
            session.commit()
    with Session(engine) as session:
        assert session.exec(select(RequesterAccount)).all() == []
