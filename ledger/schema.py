"""Every table of the shared database, registered on SQLModel.metadata: the registry's and the ledger's.

Developers autogenerate a migration (into storage/migrations/versions/) after a model change with:
    .venv/bin/python -m ledger.schema revision "what changed"
"""

from __future__ import annotations

import sys

import ledger.models  # noqa: F401  (registers the ledger's tables)
import registry.models  # noqa: F401  (registers the registry's tables)
from storage.migrate import revision

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "revision":
    revision(sys.argv[2])
