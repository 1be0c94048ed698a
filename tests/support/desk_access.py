"""AccessControl over the ledger's own `AccessDesk` (no gRPC between them): for unit tests of the
replica's rules on a real database. The same behaviour through the ledger's gRPC API is covered by
tests/serving/test_access_over_grpc.py and the stack tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Engine

from ledger.accounts.access_desk import AccessDesk
from ledger.client.rate_limits import RateLimiter
from serving.access import AccessControl
from serving.config import AccessConfig


class DeskAccess(AccessControl):
    def __init__(self, engine: Engine, config: AccessConfig, clock: Callable[[], float] = time.monotonic,
                 owner: str = "replica-test") -> None:
        self.desk = AccessDesk(engine, limiter=RateLimiter(clock))
        super().__init__(self.desk, config, owner, clock=clock, background=False)
        self.engine = engine
