"""Errors of the datanet registry and adapter registry; each message is one line a user can act on.

LedgerError
├── NotFound            (datanet, version, contribution or adapter unknown)
├── AlreadyExists       (a name is taken)
├── InvalidInput        (a name, address, price or lineage spec is malformed)
├── NothingToPublish    (no pending contributions)
└── AnchorFailed        (the version is published but its root is not on-chain yet; retry)
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class; str(error) is the one-line reason."""


class NotFound(LedgerError):
    pass


class AlreadyExists(LedgerError):
    pass


class InvalidInput(LedgerError):
    pass


class NothingToPublish(LedgerError):
    pass


class AnchorFailed(LedgerError):
    pass
