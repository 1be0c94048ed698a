"""API keys: created for a requester account, shown once, stored as a SHA-256 of their secret.

A key as a client sends it is `dgk-<id>-<secret>`: `id` (12 hex digits) finds the row, the secret's
SHA-256 is compared in constant time, and a revoked key stops working at once for new look-ups.
Only the id (`key_<id>`) ever appears in logs, metrics and traces. The last live admin key cannot be
revoked (`LastAdminKey`): administration never switches off (gateway/admin_access.py).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlmodel import Session, select

from ledger.models import ApiKey, RequesterAccount
from storage.database import utcnow

PRESENTED = re.compile(r"dgk-([0-9a-f]{12})-([A-Za-z0-9_-]{43})")
NAME_MAX = 64


def key_id(hex_part: str) -> str:
    return f"key_{hex_part}"


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# A no-op write on every live admin key: row locks on PostgreSQL, the write lock on SQLite.
_LOCK_LIVE_ADMIN_KEYS = text("UPDATE apikey SET admin = admin WHERE admin AND revoked_at IS NULL")


class LastAdminKey(ValueError):
    """Revoking this key would leave the ledger without a live admin key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} is the last live admin key: revoking it would leave no one able to administer "
                         "this ledger; create another admin key first (`gateway keys create --account ACCOUNT "
                         "--admin`), then revoke this one")
        self.key = key


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    presented: str  # the only time the whole key exists outside the client


class ApiKeys:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, account_id: str, *, name: str = "", admin: bool = False,
               requests_per_second: float | None = None, tokens_per_minute: int | None = None) -> NewKey:
        if len(name) > NAME_MAX:
            raise ValueError(f"a key name is at most {NAME_MAX} characters")
        if requests_per_second is not None and not (math.isfinite(requests_per_second) and requests_per_second > 0):
            raise ValueError("requests per second must be a finite number > 0")
        if tokens_per_minute is not None and tokens_per_minute < 1:
            raise ValueError("tokens per minute must be >= 1")
        hex_part, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with Session(self.engine) as session:
            if session.get(RequesterAccount, account_id) is None:
                raise ValueError(f"no requester account {account_id!r} (create it with `gateway accounts create`)")
            key = ApiKey(id=key_id(hex_part), account_id=account_id, secret_sha256=secret_sha256(secret), name=name,
                         admin=admin, requests_per_second=requests_per_second, tokens_per_minute=tokens_per_minute)
            session.add(key)
            session.commit()
            session.refresh(key)
        return NewKey(key, f"dgk-{hex_part}-{secret}")

    def list(self, account_id: str | None = None) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if account_id is not None:
            query = query.where(ApiKey.account_id == account_id)
        with Session(self.engine) as session:
            return list(session.exec(query).all())

    def get(self, key: str) -> ApiKey | None:
        with Session(self.engine) as session:
            return session.get(ApiKey, key)

    def revoke(self, key: str) -> ApiKey:
        """Revoke a key by id (idempotent: the first revocation time is kept).

        LastAdminKey (nothing changed) when it is the last live admin key: without one, no
        administrative command could run any more. Concurrent revocations are decided one at a time:
        the first statement write-locks every live admin key row (the database's write lock on
        SQLite), so two of them can never each see the other's key as the one left.
        """
        with Session(self.engine) as session:
            row = session.get(ApiKey, key)
            if row is None:
                raise ValueError(f"no API key {key!r}")
            if row.revoked_at is not None:
                return row
            if row.admin:
                session.execute(_LOCK_LIVE_ADMIN_KEYS)
                session.refresh(row)  # as it is under the lock
                if row.revoked_at is not None:  # revoked meanwhile: keep the first time
                    session.commit()
                    session.refresh(row)
                    return row
                live = set(session.exec(select(ApiKey.id).where(
                    ApiKey.admin == True, ApiKey.revoked_at == None)).all())  # noqa: E711, E712
                if live <= {key}:
                    session.rollback()
                    raise LastAdminKey(key)
            row.revoked_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
            return row

    def verify(self, presented: str) -> ApiKey | None:
        """The live key a client presented, or None (malformed, unknown, wrong secret or revoked)."""
        match = PRESENTED.fullmatch(presented)
        if match is None:
            return None
        row = self.get(key_id(match.group(1)))
        expected = row.secret_sha256 if row is not None else "0" * 64
        valid = hmac.compare_digest(secret_sha256(match.group(2)), expected)  # same work for unknown ids
        return row if valid and row is not None and row.revoked_at is None else None
