"""Errors of the datanet registry and adapter registry; each message is one line a user can act on.

RegistryError
├── NotFound            (datanet, version, contribution or adapter unknown)
├── AlreadyExists       (a name is taken)
├── InvalidInput        (a name, address, price or lineage spec is malformed)
├── NothingToPublish    (no pending contributions)
├── IndexStoreFailed    (the index store refused or did not answer; nothing was published)
└── AnchorFailed        (the version is published but its root is not on-chain yet; retry)
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class; str(error) is the one-line reason."""


class NotFound(RegistryError):
    pass


class AlreadyExists(RegistryError):
    pass


class InvalidInput(RegistryError):
    pass


class NothingToPublish(RegistryError):
    pass


class IndexStoreFailed(RegistryError):
    pass


class AnchorFailed(RegistryError):
    pass
