"""Usage of adapters over time: requests, completion tokens and fees per UTC day or hour, from the ingested traces.

One aggregate query over `ingestedtrace`, bounded to the window asked for: the `buckets` most recent
buckets, the current (partial) one included. The database groups by adapter and bucket and sums;
fees are summed exactly (`exact_sum`, storage/amounts.py). The bucket of a trace is its
`received_at` cut to the day or the hour as text, in UTC, written the same way on both backends:
SQLite keeps the time as UTC text ("YYYY-MM-DD HH:MM:SS.ffffff"), so its first 10 or 13 characters;
PostgreSQL keeps a `timestamptz`, formatted in UTC whatever the session's time zone.

Only buckets holding at least one trace are returned, sorted by adapter (the base model is "") then start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, literal_column
from sqlmodel import Session, col, select

from ledger.models import IngestedTrace
from storage.amounts import exact_sum
from storage.database import utcnow

BUCKETS_DEFAULT = 30
MAX_BUCKETS = {"day": 366, "hour": 720}
MAX_ADAPTERS = 1000
BASE_MODEL = ""  # the adapter name the base model's traces are counted under
_STEP = {"day": timedelta(days=1), "hour": timedelta(hours=1)}
_KEY_FORMAT = {"day": "%Y-%m-%d", "hour": "%Y-%m-%d %H"}  # the text a bucket is grouped by, parsed back
_KEY_LENGTH = {"day": 10, "hour": 13}  # SQLite: that prefix of the stored text
_PG_FORMAT = {"day": "YYYY-MM-DD", "hour": "YYYY-MM-DD HH24"}


@dataclass(frozen=True)
class UsageBucket:
    adapter: str  # "" for the base model
    start: datetime  # UTC
    requests: int
    completion_tokens: int
    fees: int  # base units


@dataclass(frozen=True)
class UsageWindow:
    """A checked request: the unit, and the first bucket's start and the end of the last one."""

    bucket: str
    since: datetime
    until: datetime


def usage_window(bucket: str = "day", buckets: int = BUCKETS_DEFAULT, now: datetime | None = None) -> UsageWindow:
    """The window of the `buckets` most recent buckets up to `now` (default: the clock); ValueError for an
    unknown bucket or a count out of range."""
    if bucket not in MAX_BUCKETS:
        raise ValueError(f"bucket must be 'day' or 'hour', not {bucket!r}")
    if not 1 <= buckets <= MAX_BUCKETS[bucket]:
        raise ValueError(f"buckets must be between 1 and {MAX_BUCKETS[bucket]} for bucket '{bucket}', not {buckets}")
    now = (now or utcnow()).astimezone(UTC)
    current = now.replace(minute=0, second=0, microsecond=0)
    if bucket == "day":
        current = current.replace(hour=0)
    step = _STEP[bucket]
    return UsageWindow(bucket, current - (buckets - 1) * step, current + step)


def usage(engine: Engine, adapters: Sequence[str] = (), *, bucket: str = "day", buckets: int = BUCKETS_DEFAULT,
          now: datetime | None = None) -> list[UsageBucket]:
    """Per adapter (all when `adapters` is empty; "" is the base model) and bucket: traces, completion
    tokens and fees received in the window of `usage_window`. ValueError for a request out of range."""
    window = usage_window(bucket, buckets, now)
    wanted = sorted(set(adapters))
    if len(wanted) > MAX_ADAPTERS:
        raise ValueError(f"at most {MAX_ADAPTERS} adapters per request, not {len(wanted)}")
    key = _bucket_key(engine.dialect.name, window.bucket)
    tokens = func.coalesce(func.sum(IngestedTrace.completion_tokens), 0)
    query = (select(IngestedTrace.adapter, key, func.count(), tokens, exact_sum(IngestedTrace.fee))
             .where(col(IngestedTrace.received_at) >= window.since, col(IngestedTrace.received_at) < window.until)
             .group_by(IngestedTrace.adapter, key))
    if wanted:
        named = [name for name in wanted if name != BASE_MODEL]
        condition = col(IngestedTrace.adapter).in_(named)
        if BASE_MODEL in wanted:
            condition = condition | col(IngestedTrace.adapter).is_(None)
        query = query.where(condition)
    with Session(engine) as session:
        rows = session.exec(query).all()
    found = [UsageBucket(adapter or BASE_MODEL,
                         datetime.strptime(text, _KEY_FORMAT[window.bucket]).replace(tzinfo=UTC),
                         int(requests), int(tokens), int(fees))
             for adapter, text, requests, tokens, fees in rows]
    return sorted(found, key=lambda b: (b.adapter, b.start))


def _bucket_key(dialect: str, bucket: str) -> Any:
    """`received_at` cut to its bucket, as text in `_KEY_FORMAT`, on this backend."""
    # Constants written into the statement, not bound: PostgreSQL must see the grouped expression and
    # the selected one as the same.
    received_at = col(IngestedTrace.received_at)
    if dialect == "sqlite":
        return func.substr(received_at, 1, literal_column(str(_KEY_LENGTH[bucket])))
    if dialect == "postgresql":
        return func.to_char(func.timezone(literal_column("'UTC'"), received_at),
                            literal_column(f"'{_PG_FORMAT[bucket]}'"))
    raise NotImplementedError(f"usage buckets on {dialect} databases")
