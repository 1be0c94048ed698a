"""The portal's sessions: kept server-side, in memory; the browser holds only the session id, in a cookie.

A session starts anonymous (`SessionStore.create`) and is signed in as a contributor (an address proven
with portal/sign_in.py) and/or as an API key holder (`KeyViewer`, from the ledger's `Authenticate`).
Signing in gives the session a new id and CSRF token (the old id stops working: set the cookie again), so
an id known before sign-in is worth nothing after it. Sessions are immutable snapshots: the store's
methods return new ones.

Secrets — the key's presented secret, the session id, the CSRF token — are left out of every `repr`.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eth_utils import is_checksum_address

if TYPE_CHECKING:
    from ledger.client.access import KeyGrant

COOKIE_NAME = "portal_session"
ID_BYTES = 32  # 256 bits, URL-safe base64 (43 characters)


@dataclass(frozen=True)
class KeyViewer:
    """An API key holder: the key's id, account and admin flag, and the secret they presented (never shown)."""

    key_id: str
    account_id: str
    admin: bool
    secret: str = field(repr=False)

    @classmethod
    def from_grant(cls, grant: KeyGrant, secret: str) -> KeyViewer:
        """The viewer of a key the ledger's `authenticate(secret)` answered with `grant`."""
        return cls(key_id=grant.key_id, account_id=grant.account_id, admin=grant.admin, secret=secret)


@dataclass(frozen=True)
class Session:
    """One browser's session; `created_at`/`expires_at` are clock seconds."""

    id: str = field(repr=False)
    csrf_token: str = field(repr=False)
    created_at: float
    expires_at: float
    contributor: str | None = None  # a checksummed address proven by sign-in
    api_key: KeyViewer | None = None


def check_csrf(session: Session, presented: object) -> bool:
    """Whether `presented` (a form field or header) is `session`'s CSRF token, compared in constant time."""
    if not isinstance(presented, str) or not presented:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), session.csrf_token.encode("utf-8"))


def cookie_settings(session: Session, *, https: bool, now: float | None = None) -> dict[str, Any]:
    """Keyword arguments of Starlette's `Response.set_cookie` for `session`: HttpOnly, SameSite=Strict,
    Path=/, Secure when the portal is served over https, lasting as long as the session."""
    remaining = session.expires_at - (time.time() if now is None else now)
    return {"key": COOKIE_NAME, "value": session.id, "max_age": max(0, int(remaining)), "path": "/",
            "secure": https, "httponly": True, "samesite": "strict"}


def clear_cookie_settings(*, https: bool) -> dict[str, Any]:
    """Keyword arguments of Starlette's `Response.delete_cookie` for the session cookie (on sign-out)."""
    return {"key": COOKIE_NAME, "path": "/", "secure": https, "httponly": True, "samesite": "strict"}


class SessionStore:
    """Sessions by id, in memory, each lasting `ttl_seconds`; at most `max_sessions` (the oldest go first)."""

    def __init__(self, ttl_seconds: float = 3600.0, max_sessions: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        if ttl_seconds <= 0 or max_sessions < 1:
            raise ValueError("ttl_seconds and max_sessions must be positive")
        self.ttl_seconds, self.max_sessions, self._clock = ttl_seconds, max_sessions, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # oldest (created or signed in) first
        self._lock = threading.Lock()

    def create(self) -> Session:
        """A new anonymous session."""
        with self._lock:
            return self._add(None, None)

    def get(self, session_id: str | None) -> Session | None:
        """The live session of that id; None (and the session forgotten) when unknown or expired."""
        with self._lock:
            return self._live(session_id, pop=False)

    def sign_in_contributor(self, session_id: str, address: str) -> Session | None:
        """The session, now also signed in as contributor `address`, under a new id; None when it is gone.
        ValueError when `address` is not checksummed (it comes from `SignInDesk.verify`)."""
        if not isinstance(address, str) or not is_checksum_address(address):
            raise ValueError(f"{address!r} is not a checksummed Ethereum address")
        with self._lock:
            session = self._live(session_id, pop=True)
            return None if session is None else self._add(address, session.api_key)

    def sign_in_key(self, session_id: str, viewer: KeyViewer) -> Session | None:
        """The session, now also signed in with the API key `viewer`, under a new id; None when it is gone."""
        with self._lock:
            session = self._live(session_id, pop=True)
            return None if session is None else self._add(session.contributor, viewer)

    def sign_out(self, session_id: str | None) -> None:
        """Forget the session (both sign-ins); the app then clears the cookie (`clear_cookie_settings`)."""
        with self._lock:
            self._sessions.pop(session_id, None)  # type: ignore[arg-type]

    def __len__(self) -> int:
        with self._lock:
            self._prune(self._clock())
            return len(self._sessions)

    def cookie(self, session: Session, *, https: bool) -> dict[str, Any]:
        """`cookie_settings` of `session` at this store's clock."""
        return cookie_settings(session, https=https, now=self._clock())

    def _live(self, session_id: str | None, *, pop: bool) -> Session | None:
        if not isinstance(session_id, str):
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        expired = self._clock() >= session.expires_at
        if pop or expired:
            del self._sessions[session_id]
        return None if expired else session

    def _add(self, contributor: str | None, api_key: KeyViewer | None) -> Session:
        now = self._clock()
        self._prune(now)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = Session(id=secrets.token_urlsafe(ID_BYTES), csrf_token=secrets.token_urlsafe(ID_BYTES),
                          created_at=now, expires_at=now + self.ttl_seconds, contributor=contributor, api_key=api_key)
        self._sessions[session.id] = session
        return session

    def _prune(self, now: float) -> None:
        while self._sessions and next(iter(self._sessions.values())).expires_at <= now:
            self._sessions.popitem(last=False)

