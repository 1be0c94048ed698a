"""What a contribution is: its normalized text, its content id, and the message its contributor signs.

- Normalization: Unicode NFC, line endings to ``\\n``, trailing spaces of each line and blank lines
  at both ends removed. Everything else (case, inner spacing) is kept.
- Content id: lower-case hex SHA-256 of the normalized text's UTF-8 bytes.
- Signature: EIP-191 personal message (``personal_sign``) over the text of `signing_message`,
  which binds the datanet id and the content id. The ledger recovers the signer's address from it.
"""

from __future__ import annotations

import hashlib
import unicodedata

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_hex_address, to_checksum_address


class BadSignature(ValueError):
    """A signature that is malformed or does not belong to the claimed contributor."""


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n").strip()


def content_id(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def signing_message(datanet_id: str, contribution_id: str) -> str:
    return f"Datanet Gateway contribution\ndatanet: {datanet_id}\ncontent sha256: {contribution_id}"


def sign_contribution(private_key: str | bytes, datanet_id: str, contribution_id: str) -> str:
    """The contributor's signature (0x hex, 65 bytes) over the datanet id and content id."""
    message = encode_defunct(text=signing_message(datanet_id, contribution_id))
    return "0x" + Account.sign_message(message, private_key).signature.hex().removeprefix("0x")


def recover_contributor(datanet_id: str, contribution_id: str, signature: str) -> str:
    """The checksummed address that produced `signature`; BadSignature when it is not one."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        if len(raw) != 65:
            raise ValueError("a signature is 65 bytes")
        message = encode_defunct(text=signing_message(datanet_id, contribution_id))
        return to_checksum_address(Account.recover_message(message, signature=raw))
    except Exception as exc:  # eth-keys raises several types for malformed input
        raise BadSignature(f"malformed signature ({exc})") from None


def checksum_address(address: str) -> str:
    """`address` checksummed; ValueError with a clear message when it is not an address."""
    if not isinstance(address, str) or not is_hex_address(address):
        raise ValueError(f"'{address}' is not an Ethereum address (0x followed by 40 hex digits)")
    return to_checksum_address(address)


def address_of_key(private_key: str) -> str:
    return to_checksum_address(Account.from_key(private_key).address)
