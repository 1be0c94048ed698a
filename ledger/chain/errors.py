"""Errors of the chain layer; each message is one line a user can act on and never holds a key.

ChainError
├── ChainNodeError        (the local anvil is missing, cannot start, or did not stop cleanly)
├── ChainConfigError      (no operator key for a remote chain, unreadable key file)
├── ChainUnavailable      (the JSON-RPC endpoint does not answer)
├── TransactionReverted   (a call or transaction reverted; .error_name names the custom error)
└── TransactionTimeout    (no receipt within the timeout; the transaction may still be mined)
"""

from __future__ import annotations


class ChainError(Exception):
    """Base class; str(error) is the one-line reason."""


class ChainNodeError(ChainError):
    pass


class ChainConfigError(ChainError):
    pass


class ChainUnavailable(ChainError):
    pass


class TransactionReverted(ChainError):
    """A revert; `error_name` is the decoded custom error (``"VersionAlreadyAnchored"``) when known."""

    def __init__(self, message: str, error_name: str | None = None, error_args: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.error_name = error_name
        self.error_args = error_args


class TransactionTimeout(ChainError):
    def __init__(self, message: str, tx_hash: str) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash
