"""EIP-4361 sign-in: message layout and parsing, and the desk's acceptance and refusals."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from portal.sessions import SessionStore
from portal.sign_in import SignInDesk, SignInRefused, SignInRequest, parse_message
from tests.support.clock import ManualClock

DOMAIN, URI, CHAIN = "127.0.0.1:8080", "http://127.0.0.1:8080/sign-in", 1
KEY = "0x" + "11" * 32
OTHER_KEY = "0x" + "22" * 32
ADDRESS = Account.from_key(KEY).address
T0 = 1_800_000_000.0


def sign(message: str, key: str = KEY) -> str:
    return "0x" + Account.sign_message(encode_defunct(text=message), key).signature.hex().removeprefix("0x")


def desk(clock: ManualClock | None = None, **kwargs: object) -> SignInDesk:
    return SignInDesk(DOMAIN, URI, CHAIN, clock=clock or ManualClock(T0), **kwargs)  # type: ignore[arg-type]


def sign_in(store: SessionStore, session_id: str, desk_: SignInDesk, message: str, signature: str) -> str | None:
    """What the portal's handler does: verify, then sign the session in; the refusal's reason, if any."""
    try:
        address = desk_.verify(message, signature)
    except SignInRefused as refused:
        return refused.reason
    store.sign_in_contributor(session_id, address)
    return None


EXAMPLE = SignInRequest(domain=DOMAIN, address=ADDRESS, uri=URI, chain_id=CHAIN, nonce="a1b2c3d4e5f6a7b8",
                        issued_at=datetime(2026, 12, 4, 10, 0, 0, tzinfo=timezone.utc),
                        expiration_time=datetime(2026, 12, 4, 10, 5, 0, tzinfo=timezone.utc),
                        statement="Sign in to the portal.")


def test_message_has_the_eip_4361_layout() -> None:
    assert EXAMPLE.to_message() == (
        f"127.0.0.1:8080 wants you to sign in with your Ethereum account:\n{ADDRESS}\n\n"
        "Sign in to the portal.\n\nURI: http://127.0.0.1:8080/sign-in\nVersion: 1\nChain ID: 1\n"
        "Nonce: a1b2c3d4e5f6a7b8\nIssued At: 2026-12-04T10:00:00Z\nExpiration Time: 2026-12-04T10:05:00Z")


@pytest.mark.parametrize("statement", ["Sign in to the portal.", ""])
def test_message_round_trip(statement: str) -> None:
    request = SignInRequest(**{**EXAMPLE.__dict__, "statement": statement})
    assert parse_message(request.to_message()) == request
    if not statement:
        assert f"{ADDRESS}\n\n\nURI: " in request.to_message()


def test_round_trip_keeps_fractional_seconds_and_converts_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    request = SignInRequest(**{**EXAMPLE.__dict__, "issued_at": datetime(2026, 12, 4, 12, 0, 0, 250000, plus_two)})
    assert "Issued At: 2026-12-04T10:00:00.250000Z" in request.to_message()
    assert parse_message(request.to_message()) == request


def replace_line(message: str, old: str, new: str) -> str:
    assert old in message
    return message.replace(old, new, 1)


GOOD = EXAMPLE.to_message()


@pytest.mark.parametrize("text, words", [
    ("", "first line"),
    (replace_line(GOOD, " wants you", " would like you"), "first line"),
    (replace_line(GOOD, "127.0.0.1:8080 wants", "https://127.0.0.1:8080 wants"), "scheme"),
    (replace_line(GOOD, ADDRESS, ADDRESS.lower()), "checksummed"),
    (replace_line(GOOD, ADDRESS, "0x1234"), "checksummed"),
    (replace_line(GOOD, "Version: 1", "Version: 2"), "version"),
    (replace_line(GOOD, "Chain ID: 1", "Chain ID: one"), "chain id"),
    (replace_line(GOOD, "Chain ID: 1", "Chain ID: 01"), "chain id"),
    (replace_line(GOOD, "Nonce: a1b2c3d4e5f6a7b8", "Nonce: abc"), "nonce"),
    (replace_line(GOOD, "Nonce: a1b2c3d4e5f6a7b8", "Nonce: a1b2c3d4-e5f6a7b8"), "nonce"),
    (replace_line(GOOD, "2026-12-04T10:00:00Z", "yesterday"), "Issued At"),
    (replace_line(GOOD, "2026-12-04T10:00:00Z", "2026-12-04T10:00:00"), "Issued At"),
    (replace_line(GOOD, "2026-12-04T10:05:00Z", "2026-13-04T10:05:00Z"), "Expiration Time"),
    (replace_line(GOOD, "\nExpiration Time: 2026-12-04T10:05:00Z", ""), "Expiration Time"),
    (GOOD + "\nNot Before: 2026-12-04T10:00:00Z", "unexpected line"),
    (GOOD + "\n", "unexpected line"),
    (replace_line(GOOD, "URI: ", "Uri: "), "URI"),
    (replace_line(GOOD, "URI: http://127.0.0.1:8080/sign-in", "URI: not a uri"), "URI"),
    (replace_line(GOOD, "Sign in to the portal.\n\n", "Sign in\nto the portal.\n\n"), "empty line"),
    (GOOD.replace("\n", "\r\n"), "carriage return"),
])
def test_parse_refuses_malformed_messages_saying_why(text: str, words: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_message(text)
    assert words.lower() in str(error.value).lower()


def test_request_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="time zone"):
        SignInRequest(**{**EXAMPLE.__dict__, "issued_at": datetime(2026, 12, 4)})
    with pytest.raises(ValueError, match="statement"):
        SignInRequest(**{**EXAMPLE.__dict__, "statement": "two\nlines"})
    with pytest.raises(ValueError, match="chain id"):
        SignInRequest(**{**EXAMPLE.__dict__, "chain_id": 0})


def test_challenge_is_fresh_and_verifies_to_the_signer() -> None:
    clock = ManualClock(T0)
    sign_in_desk = desk(clock)
    first, second = sign_in_desk.challenge(ADDRESS.lower()), sign_in_desk.challenge(ADDRESS)
    assert first.address == ADDRESS and first.nonce != second.nonce
    assert len(first.nonce) >= 24 and first.nonce.isalnum()  # at least 96 bits of hex
    assert (first.domain, first.uri, first.chain_id) == (DOMAIN, URI, CHAIN)
    assert first.issued_at == datetime.fromtimestamp(T0, timezone.utc)
    assert first.expiration_time == datetime.fromtimestamp(T0 + 300, timezone.utc)
    message = first.to_message()
    assert sign_in_desk.verify(message, sign(message)) == ADDRESS
    assert sign_in_desk.verify(second.to_message(), sign(second.to_message()).removeprefix("0x")) == ADDRESS


def test_signature_with_v_0_or_1_is_accepted() -> None:
    sign_in_desk = desk()
    message = sign_in_desk.challenge(ADDRESS).to_message()
    raw = bytearray(bytes.fromhex(sign(message)[2:]))
    raw[64] -= 27
    assert sign_in_desk.verify(message, "0x" + raw.hex()) == ADDRESS


def test_challenge_refuses_what_is_not_an_address() -> None:
    with pytest.raises(SignInRefused, match="not an Ethereum address"):
        desk().challenge("0xnothex")


def issued(sign_in_desk: SignInDesk, **changes: object) -> str:
    return SignInRequest(**{**sign_in_desk.challenge(ADDRESS).__dict__, **changes}).to_message()


def other_desk_message() -> str:
    """A request of the same portal's fields, issued by another desk (e.g. before a restart)."""
    return desk().challenge(ADDRESS).to_message()


def signed(message: str, key: str = KEY, edit: Callable[[str], str] = lambda s: s) -> tuple[str, str]:
    return message, edit(sign(message, key))


REFUSALS: dict[str, tuple[Callable[[SignInDesk], tuple[str, str]], str]] = {
    "malformed message": (lambda d: signed("hello"), "not a sign-in message of this portal"),
    "wrong domain": (lambda d: signed(issued(d, domain="evil.example")), "for evil.example, not 127.0.0.1:8080"),
    "wrong uri": (lambda d: signed(issued(d, uri="https://evil.example/")), "for https://evil.example/, not"),
    "wrong chain": (lambda d: signed(issued(d, chain_id=5)), "chain 5, not chain 1"),
    "unknown nonce": (lambda d: signed(other_desk_message()), "not issued here"),
    "changed statement": (lambda d: signed(issued(d, statement="Give all")), "differs from the one"),
    "other signer": (lambda d: signed(issued(d), OTHER_KEY), f"not made with the key of {ADDRESS}"),
    "short signature": (lambda d: signed(issued(d), edit=lambda s: s[:-2]), "signature is malformed"),
    "non-hex signature": (lambda d: signed(issued(d), edit=lambda s: "0x" + "zz" * 65), "signature is malformed"),
    "invalid v": (lambda d: signed(issued(d), edit=lambda s: s[:-2] + "05"), "signature is malformed"),
    "no signature": (lambda d: signed(issued(d), edit=lambda s: ""), "signature is malformed"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_says_why_and_signs_no_session_in(case: str) -> None:
    make, words = REFUSALS[case]
    sign_in_desk, store = desk(), SessionStore(clock=ManualClock(T0))
    session = store.create()
    message, signature = make(sign_in_desk)
    reason = sign_in(store, session.id, sign_in_desk, message, signature)
    assert reason is not None and words in reason, reason
    assert store.get(session.id) is not None and store.get(session.id).contributor is None  # type: ignore[union-attr]


def test_signed_in_session_after_success() -> None:
    sign_in_desk, store = desk(), SessionStore(clock=ManualClock(T0))
    session = store.create()
    message = sign_in_desk.challenge(ADDRESS).to_message()
    assert sign_in(store, session.id, sign_in_desk, message, sign(message)) is None
    assert store.get(session.id) is None  # rotated on sign-in
    assert len(store) == 1


def test_a_used_nonce_is_refused() -> None:
    sign_in_desk = desk()
    message = sign_in_desk.challenge(ADDRESS).to_message()
    assert sign_in_desk.verify(message, sign(message)) == ADDRESS
    with pytest.raises(SignInRefused, match="already used"):
        sign_in_desk.verify(message, sign(message))


def test_a_failed_attempt_consumes_the_nonce() -> None:
    sign_in_desk = desk()
    message = sign_in_desk.challenge(ADDRESS).to_message()
    with pytest.raises(SignInRefused, match="not made with the key"):
        sign_in_desk.verify(message, sign(message, OTHER_KEY))
    with pytest.raises(SignInRefused, match="already used"):
        sign_in_desk.verify(message, sign(message))
    assert sign_in_desk.outstanding() == 0


def test_expiry_with_an_injected_clock() -> None:
    clock = ManualClock(T0)
    sign_in_desk = desk(clock, ttl_seconds=60)
    late, on_time = sign_in_desk.challenge(ADDRESS).to_message(), sign_in_desk.challenge(ADDRESS).to_message()
    clock.now += 59
    assert sign_in_desk.verify(on_time, sign(on_time)) == ADDRESS
    clock.now += 1
    with pytest.raises(SignInRefused, match="expired"):
        sign_in_desk.verify(late, sign(late))
    assert sign_in_desk.outstanding() == 0


def test_expired_and_forgotten_challenge_still_says_expired() -> None:
    clock = ManualClock(T0)
    sign_in_desk = desk(clock, ttl_seconds=60)
    message = sign_in_desk.challenge(ADDRESS).to_message()
    clock.now += 120
    sign_in_desk.challenge(ADDRESS)  # prunes the expired one
    assert sign_in_desk.outstanding() == 1
    with pytest.raises(SignInRefused, match="expired"):
        sign_in_desk.verify(message, sign(message))


def test_outstanding_challenges_are_bounded_oldest_first() -> None:
    sign_in_desk = desk(max_outstanding=3)
    oldest = sign_in_desk.challenge(ADDRESS).to_message()
    newer = [sign_in_desk.challenge(ADDRESS).to_message() for _ in range(3)]
    assert sign_in_desk.outstanding() == 3
    with pytest.raises(SignInRefused, match="not issued here"):
        sign_in_desk.verify(oldest, sign(oldest))
    assert all(sign_in_desk.verify(m, sign(m)) == ADDRESS for m in newer)


def test_concurrent_verifies_of_one_message_succeed_once() -> None:
    sign_in_desk = desk()
    message = sign_in_desk.challenge(ADDRESS).to_message()
    signature, outcomes, barrier = sign(message), [], threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            outcomes.append(sign_in_desk.verify(message, signature))
        except SignInRefused as refused:
            outcomes.append(refused.reason)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(ADDRESS) == 1
    assert sum("already used" in outcome for outcome in outcomes) == 7
