"""Sign-In with Ethereum (EIP-4361) for contributors: the message, its parser, and the desk that checks it.

The portal hands out a `SignInRequest` (`SignInDesk.challenge`), the wallet signs `to_message()` with
`personal_sign` (EIP-191, as contributions are signed in registry/contribution_content.py), and
`SignInDesk.verify` returns the proven checksummed address or raises `SignInRefused`, whose text a page
may show. Nonces live only here, in memory: each is single use (the first verify naming it consumes it,
whatever the outcome) and expires after `ttl_seconds`.

Only the subset of EIP-4361 the portal issues is accepted: no scheme before the domain, version 1, and
exactly the fields URI, Version, Chain ID, Nonce, Issued At, Expiration Time (no Not Before, Request ID
or Resources).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_checksum_address, is_hex_address, to_checksum_address

PREAMBLE = " wants you to sign in with your Ethereum account:"
STATEMENT = "Sign in to the Datanet Gateway contributor portal."
NONCE_BYTES = 16  # 128 bits, as 32 hex digits (EIP-4361 nonces are alphanumeric, at least 8 characters)
MAX_OUTSTANDING = 10_000  # challenges (and recently used nonces) remembered at once
_NONCE = re.compile(r"[A-Za-z0-9]{8,}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
_AUTHORITY = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:@\[\]-]+")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]*")
_FIELDS = ("URI", "Version", "Chain ID", "Nonce", "Issued At", "Expiration Time")


class SignInRefused(ValueError):
    """A sign-in that was not accepted; `reason` (also the exception's text) is fit to show the person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a `Z` (fractional seconds only when there are any)."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S" + (".%f" if utc.microsecond else "") + "Z")


def _parse_timestamp(name: str, text: str) -> datetime:
    if not _TIMESTAMP.fullmatch(text):
        raise ValueError(f"{name} {text!r} is not an RFC 3339 timestamp (like 2026-01-31T12:00:00Z)")
    try:
        return datetime.fromisoformat(text).astimezone(timezone.utc)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a valid date and time") from None


@dataclass(frozen=True)
class SignInRequest:
    """The fields of one EIP-4361 message; ValueError on construction when one is not valid."""

    domain: str
    address: str
    uri: str
    chain_id: int
    nonce: str
    issued_at: datetime
    expiration_time: datetime
    statement: str = STATEMENT

    def __post_init__(self) -> None:
        if not _AUTHORITY.fullmatch(self.domain):
            raise ValueError(f"domain {self.domain!r} is not a host (and port), like 127.0.0.1:8080")
        if not is_checksum_address(self.address):
            raise ValueError(f"{self.address!r} is not a checksummed (EIP-55) Ethereum address")
        if not _URI.fullmatch(self.uri):
            raise ValueError(f"URI {self.uri!r} is not an absolute URI without spaces")
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id < 1:
            raise ValueError(f"chain id {self.chain_id!r} is not a positive integer")
        if not _NONCE.fullmatch(self.nonce):
            raise ValueError(f"nonce {self.nonce!r} is not at least 8 letters and digits")
        if not re.fullmatch(r"[\x20-\x7e]*", self.statement):
            raise ValueError("the statement is not one line of printable ASCII")
        for name in ("issued_at", "expiration_time"):
            if getattr(self, name).utcoffset() is None:
                raise ValueError(f"{name} has no time zone")

    def to_message(self) -> str:
        """The exact text the wallet signs."""
        statement = f"{self.statement}\n" if self.statement else ""
        return (f"{self.domain}{PREAMBLE}\n{self.address}\n\n{statement}\n"
                f"URI: {self.uri}\nVersion: 1\nChain ID: {self.chain_id}\nNonce: {self.nonce}\n"
                f"Issued At: {format_timestamp(self.issued_at)}\n"
                f"Expiration Time: {format_timestamp(self.expiration_time)}")


def parse_message(text: str) -> SignInRequest:
    """The request `text` states; ValueError saying what is wrong when it is not exactly such a message."""
    if not isinstance(text, str):
        raise ValueError("the message is not text")
    if "\r" in text:
        raise ValueError("the message has carriage returns: lines end with \\n only")
    lines = text.split("\n")
    if not lines[0].endswith(PREAMBLE) or not lines[0].removesuffix(PREAMBLE):
        raise ValueError(f"the first line is not '<domain>{PREAMBLE}'")
    domain = lines[0].removesuffix(PREAMBLE)
    if "://" in domain:
        raise ValueError(f"{domain!r} has a scheme: the first line names a domain only")
    if len(lines) < 4 or lines[2] != "":
        raise ValueError("the address is not followed by an empty line")
    if lines[3] == "":
        statement, rest = "", lines[4:]
    elif len(lines) > 4 and lines[4] == "":
        statement, rest = lines[3], lines[5:]
    else:
        raise ValueError("the statement is not followed by an empty line")
    values: list[str] = []
    for i, name in enumerate(_FIELDS):
        if i >= len(rest) or not rest[i].startswith(f"{name}: "):
            raise ValueError(f"expected a '{name}: ' line (after {_FIELDS[i - 1] if i else 'the statement'})")
        values.append(rest[i].removeprefix(f"{name}: "))
    if len(rest) > len(_FIELDS):
        raise ValueError(f"unexpected line after Expiration Time: {rest[len(_FIELDS)][:40]!r}")
    uri, version, chain_id, nonce, issued_at, expiration_time = values
    if version != "1":
        raise ValueError(f"version {version!r} is not supported (only 1)")
    if not re.fullmatch(r"[1-9][0-9]{0,18}", chain_id):
        raise ValueError(f"chain id {chain_id!r} is not a positive integer")
    return SignInRequest(domain=domain, address=lines[1], uri=uri, chain_id=int(chain_id), nonce=nonce,
                         issued_at=_parse_timestamp("Issued At", issued_at),
                         expiration_time=_parse_timestamp("Expiration Time", expiration_time),
                         statement=statement)


def recover_signer(message: str, signature: str) -> str:
    """The checksummed address whose key made the EIP-191 `signature` (0x hex, 65 bytes) of `message`."""
    if not isinstance(signature, str) or not re.fullmatch(r"(0x)?[0-9a-fA-F]{130}", signature):
        raise ValueError("a signature is 65 bytes written as 130 hex digits")
    return to_checksum_address(Account.recover_message(encode_defunct(text=message),
                                                       signature=bytes.fromhex(signature.removeprefix("0x"))))


class SignInDesk:
    """Issues sign-in challenges for one portal (its domain, URI and chain id) and verifies their signatures."""

    def __init__(self, domain: str, uri: str, chain_id: int, *, ttl_seconds: float = 300.0,
                 clock: Callable[[], float] = time.time, statement: str = STATEMENT,
                 max_outstanding: int = MAX_OUTSTANDING) -> None:
        if ttl_seconds <= 0 or max_outstanding < 1:
            raise ValueError("ttl_seconds and max_outstanding must be positive")
        self.domain, self.uri, self.chain_id, self.statement = domain, uri, chain_id, statement
        self.ttl_seconds, self.max_outstanding, self._clock = ttl_seconds, max_outstanding, clock
        self._issued: OrderedDict[str, SignInRequest] = OrderedDict()  # by nonce, oldest first
        self._used: OrderedDict[str, float] = OrderedDict()  # nonce → when its request expired(s)
        self._lock = threading.Lock()

    def challenge(self, address: str) -> SignInRequest:
        """A fresh request for `address` to sign; SignInRefused when it is not an Ethereum address."""
        if not isinstance(address, str) or not is_hex_address(address):
            raise SignInRefused(f"{str(address)[:60]!r} is not an Ethereum address (0x followed by 40 hex digits)")
        now = self._clock()
        expires = datetime.fromtimestamp(int(now + self.ttl_seconds), timezone.utc)
        request = SignInRequest(domain=self.domain, address=to_checksum_address(address), uri=self.uri,
                                chain_id=self.chain_id, nonce=secrets.token_hex(NONCE_BYTES),
                                issued_at=datetime.fromtimestamp(int(now), timezone.utc), expiration_time=expires,
                                statement=self.statement)
        with self._lock:
            self._prune(now)
            while len(self._issued) >= self.max_outstanding:
                self._issued.popitem(last=False)
            self._issued[request.nonce] = request
        return request

    def verify(self, message: str, signature: str) -> str:
        """The checksummed address that signed `message`, a request this desk issued; else SignInRefused."""
        try:
            request = parse_message(message)
        except ValueError as exc:
            raise SignInRefused(f"This is not a sign-in message of this portal: {str(exc)[:200]}.") from None
        now = self._clock()
        with self._lock:  # consume the nonce first: one attempt per nonce, whatever its outcome
            issued = self._issued.pop(request.nonce, None)
            used = request.nonce in self._used
            if issued is not None:
                self._used[request.nonce] = issued.expiration_time.timestamp()
                while len(self._used) > self.max_outstanding:
                    self._used.popitem(last=False)
            self._prune(now)
        if request.domain != self.domain:
            raise SignInRefused(f"The message is for {request.domain[:100]}, not {self.domain}.")
        if request.uri != self.uri:
            raise SignInRefused(f"The message is for {request.uri[:100]}, not {self.uri}.")
        if request.chain_id != self.chain_id:
            raise SignInRefused(f"The message is for chain {request.chain_id}, not chain {self.chain_id}.")
        if used:
            raise SignInRefused("This sign-in message was already used: ask for a new one.")
        expires = (issued or request).expiration_time.timestamp()  # the message's own when it was not issued here
        if now >= expires:
            raise SignInRefused("This sign-in message has expired: ask for a new one.")
        if issued is None:
            raise SignInRefused("This sign-in message was not issued here (or was forgotten): ask for a new one.")
        if request != issued:
            raise SignInRefused("The message differs from the one this portal issued: sign it unchanged.")
        try:
            signer = recover_signer(message, signature)
        except Exception as exc:  # eth-keys raises several types for malformed signatures
            raise SignInRefused(f"The signature is malformed ({exc}).") from None
        if signer != request.address:
            raise SignInRefused(f"The signature was not made with the key of {request.address}.")
        return signer

    def outstanding(self) -> int:
        """How many challenges are waiting for their signature."""
        with self._lock:
            self._prune(self._clock())
            return len(self._issued)

    def _prune(self, now: float) -> None:
        """Forget expired challenges and used nonces (both kept oldest first, so from the front)."""
        while self._issued and next(iter(self._issued.values())).expiration_time.timestamp() <= now:
            self._issued.popitem(last=False)
        while self._used and next(iter(self._used.values())) <= now:
            self._used.popitem(last=False)
