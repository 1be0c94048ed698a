"""Portal sessions: ids, sign-ins, expiry, bounds, secrets kept out of repr, cookie settings and CSRF."""

from __future__ import annotations

import logging
import re
import threading

import pytest
from eth_account import Account

from ledger.client.access import KeyGrant
from portal.sessions import (COOKIE_NAME, KeyViewer, Session, SessionStore, check_csrf, clear_cookie_settings,
                             cookie_settings)
from tests.support.clock import ManualClock

SECRET = "dgk-s3cr3t-abcdefghijklmnopqrstuvwxyz"
ADDRESS = Account.from_key("0x" + "11" * 32).address
VIEWER = KeyViewer(key_id="key-1", account_id="acct-1", admin=False, secret=SECRET)
T0 = 1_800_000_000.0


def test_session_ids_are_random_url_safe_and_long() -> None:
    store = SessionStore(clock=ManualClock(T0))
    sessions = [store.create() for _ in range(50)]
    assert len({s.id for s in sessions}) == 50 and len({s.csrf_token for s in sessions}) == 50
    for session in sessions:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", session.id)  # ≥ 256 bits of URL-safe base64
        assert (session.created_at, session.expires_at) == (T0, T0 + 3600)
        assert session.contributor is None and session.api_key is None
        assert store.get(session.id) == session


def test_secret_never_in_repr_or_str() -> None:
    session = SessionStore(clock=ManualClock(T0)).sign_in_key(SessionStore(clock=ManualClock(T0)).create().id, VIEWER)
    assert session is None  # another store's id is unknown
    store = SessionStore(clock=ManualClock(T0))
    session = store.sign_in_key(store.create().id, VIEWER)
    assert session is not None and session.api_key == VIEWER and session.api_key.secret == SECRET
    for text in (repr(VIEWER), str(VIEWER), repr(session), str(session), f"{session}", f"{session!r}"):
        assert SECRET not in text and "secret" not in text
        assert session.id not in text and session.csrf_token not in text
    assert "key-1" in repr(VIEWER) and "acct-1" in repr(session)


def test_secret_not_logged_nor_in_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    store = SessionStore(clock=ManualClock(T0))
    session = store.sign_in_key(store.create().id, VIEWER)
    with caplog.at_level(logging.INFO):
        logging.getLogger("portal.test").info("signed in: %s", session)
        try:
            raise RuntimeError(f"could not forward for {session!r}")
        except RuntimeError as error:
            logging.getLogger("portal.test").exception("failed: %s", error)
    assert caplog.text and SECRET not in caplog.text


def test_viewer_from_the_ledgers_grant() -> None:
    grant = KeyGrant("key-9", "acct-9", True, requests_per_second=5.0)
    assert KeyViewer.from_grant(grant, SECRET) == KeyViewer("key-9", "acct-9", True, SECRET)


def test_sign_ins_rotate_the_id_and_keep_each_other() -> None:
    clock = ManualClock(T0)
    store = SessionStore(clock=clock)
    anonymous = store.create()
    clock.now += 10
    contributor = store.sign_in_contributor(anonymous.id, ADDRESS)
    assert contributor is not None and contributor.contributor == ADDRESS and contributor.api_key is None
    assert contributor.id != anonymous.id and contributor.csrf_token != anonymous.csrf_token
    assert store.get(anonymous.id) is None and store.sign_in_key(anonymous.id, VIEWER) is None
    assert contributor.expires_at == T0 + 10 + 3600
    both = store.sign_in_key(contributor.id, VIEWER)
    assert both is not None and (both.contributor, both.api_key) == (ADDRESS, VIEWER)
    assert store.get(both.id) == both and store.get(contributor.id) is None
    assert len(store) == 1


def test_only_a_checksummed_address_signs_in() -> None:
    store = SessionStore(clock=ManualClock(T0))
    session = store.create()
    for address in (ADDRESS.lower(), "0x1234", None):
        with pytest.raises(ValueError, match="checksummed"):
            store.sign_in_contributor(session.id, address)  # type: ignore[arg-type]
    assert store.get(session.id) == session


def test_sign_out_forgets_the_session() -> None:
    store = SessionStore(clock=ManualClock(T0))
    session = store.sign_in_contributor(store.create().id, ADDRESS)
    assert session is not None
    store.sign_out(session.id)
    assert store.get(session.id) is None and len(store) == 0
    store.sign_out(session.id)  # twice, or an unknown id: nothing happens
    store.sign_out(None)


def test_expired_sessions_are_none_and_dropped() -> None:
    clock = ManualClock(T0)
    store = SessionStore(ttl_seconds=60, clock=clock)
    session = store.create()
    clock.now += 59.9
    assert store.get(session.id) == session
    clock.now += 0.1
    assert store.get(session.id) is None
    assert len(store) == 0
    assert store.sign_in_contributor(session.id, ADDRESS) is None
    assert store.get(None) is None and store.get("unknown") is None


def test_store_is_bounded_evicting_the_oldest() -> None:
    clock = ManualClock(T0)
    store = SessionStore(max_sessions=3, clock=clock)
    first, second, third = store.create(), store.create(), store.create()
    fourth = store.create()
    assert store.get(first.id) is None
    assert all(store.get(s.id) is not None for s in (second, third, fourth)) and len(store) == 3
    signed_in = store.sign_in_contributor(second.id, ADDRESS)  # now the newest
    assert signed_in is not None
    store.create()
    assert store.get(third.id) is None and store.get(signed_in.id) is not None and len(store) == 3


def test_expired_sessions_leave_room_before_live_ones_are_evicted() -> None:
    clock = ManualClock(T0)
    store = SessionStore(ttl_seconds=60, max_sessions=2, clock=clock)
    store.create()
    clock.now += 30
    live = store.create()
    clock.now += 31  # the first has expired
    newest = store.create()
    assert store.get(live.id) == live and store.get(newest.id) == newest and len(store) == 2


def test_concurrent_creates_stay_bounded() -> None:
    store = SessionStore(max_sessions=100)

    def create_many() -> None:
        for _ in range(200):
            store.create()

    threads = [threading.Thread(target=create_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) == 100


@pytest.mark.parametrize("https", [False, True])
def test_cookie_settings(https: bool) -> None:
    clock = ManualClock(T0)
    store = SessionStore(ttl_seconds=600, clock=clock)
    session = store.create()
    clock.now += 100
    assert store.cookie(session, https=https) == {
        "key": COOKIE_NAME, "value": session.id, "max_age": 500, "path": "/", "secure": https, "httponly": True,
        "samesite": "strict"}
    assert COOKIE_NAME == "portal_session"
    assert cookie_settings(session, https=https, now=T0 + 700)["max_age"] == 0
    assert clear_cookie_settings(https=https) == {"key": COOKIE_NAME, "path": "/", "secure": https, "httponly": True,
                                                  "samesite": "strict"}


def test_cookie_settings_fit_starlette() -> None:
    from starlette.responses import Response
    session = SessionStore(clock=ManualClock(T0)).create()
    response = Response()
    response.set_cookie(**cookie_settings(session, https=True, now=T0))
    header = response.headers["set-cookie"]
    assert header.startswith(f"portal_session={session.id};")
    for attribute in ("HttpOnly", "Max-Age=3600", "Path=/", "SameSite=strict", "Secure"):
        assert attribute in header
    response = Response()
    response.set_cookie(**cookie_settings(session, https=False, now=T0))
    assert "Secure" not in response.headers["set-cookie"]
    response = Response()
    response.delete_cookie(**clear_cookie_settings(https=False))
    assert "portal_session=" in response.headers["set-cookie"] and "Max-Age=0" in response.headers["set-cookie"]


def test_csrf_check() -> None:
    store = SessionStore(clock=ManualClock(T0))
    session, other = store.create(), store.create()
    assert check_csrf(session, session.csrf_token)
    for presented in (other.csrf_token, "", None, 42, session.csrf_token[:-1], session.csrf_token + "x",
                      session.csrf_token.swapcase(), "é"):
        assert not check_csrf(session, presented)


def test_session_is_immutable() -> None:
    session = SessionStore(clock=ManualClock(T0)).create()
    with pytest.raises(AttributeError):
        session.contributor = ADDRESS  # type: ignore[misc]
    assert isinstance(session, Session)
