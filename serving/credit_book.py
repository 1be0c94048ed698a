"""Credit an engine replica leases from the ledger and spends locally, so admission makes no call.

Per account, the replica holds at most one **lease** (ledger/accounts/transfers.py): credit the
ledger reserved for it. Admitting a request takes the request's worst-case cost off the lease's
local remainder (`hold`: a dictionary update under a lock); finishing it gives back what it did not
cost (`finish`). Each admission becomes a **hold** at the ledger, reported in batches by a
background thread every `report_every_seconds`, together with voids of requests that will not be
billed. The ledger posts a hold when the request's trace is ingested.

A lease is renewed ahead of need by the background thread, woken as soon as a lease's remainder
falls below `refill_below` of what was granted (and at half the lease's life at the ledger, so a
lease in use never expires): a new lease replaces it, and the old one is returned once the holds
drawn from it are reported (so they are drawn from it, not from the account). Only a request the
lease cannot cover waits for a new lease on its own path. An idle lease (`idle_return_seconds`) is
returned. A lease is asked for `lease_requests` times the cost
of the request that needs it, and granted what is available, up to that.

What a replica can spend is bounded by what the ledger granted it: with the ledger down it keeps
admitting against the leases it holds and refuses (`LedgerUnavailable`) once one runs out. The
ledger bounds the rest (transfers.py, "bounded overdraw").
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ledger.client.access import AccessLedger, HoldItem, LedgerUnavailable, NoCredit
from serving.metrics import ledger_dealings

log = logging.getLogger(__name__)

LEASE_REQUESTS = 64
LEASE_TTL_SECONDS = 300.0  # asked of the ledger; a lease is renewed at half its life, so it never expires in use
REFILL_BELOW = 0.25
REPORT_EVERY_SECONDS = 0.05
IDLE_WAIT_SECONDS = 1.0  # between rounds while the book holds nothing
IDLE_RETURN_SECONDS = 30.0
UNREPORTED_MAX = 100_000  # holds waiting for the ledger; beyond it admission refuses (the ledger is away)


@dataclass
class _Lease:
    lease_id: str
    account_id: str
    granted: int
    unit: int  # the request cost the lease was sized for
    granted_at: float
    used: int = 0  # worst cost of requests in flight + actual cost of finished ones
    in_flight: int = 0
    last_used: float = 0.0

    @property
    def left(self) -> int:
        return self.granted - self.used


@dataclass
class _Held:
    lease: _Lease
    amount: int


class CreditBook:
    def __init__(self, ledger: AccessLedger, owner: str, *, lease_requests: int = LEASE_REQUESTS,
                 refill_below: float = REFILL_BELOW, report_every_seconds: float = REPORT_EVERY_SECONDS,
                 idle_return_seconds: float = IDLE_RETURN_SECONDS, lease_ttl_seconds: float = LEASE_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic, background: bool = True) -> None:
        self.ledger = ledger
        self.owner = owner
        self.lease_requests = lease_requests
        self.refill_below = refill_below
        self.idle_return_seconds = idle_return_seconds
        self.lease_ttl_seconds = lease_ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._held: dict[str, _Held] = {}
        self._unreported: OrderedDict[str, HoldItem] = OrderedDict()
        self._retiring: list[_Lease] = []  # replaced; returned once their holds are reported
        self._wake = threading.Event()
        self._account_locks: dict[str, threading.Lock] = {}
        self._stopped = threading.Event()
        self.refused_reports = 0
        self._dealings = ledger_dealings()  # exported from the start, at zero
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(report_every_seconds,), name="credit-book",
                                            daemon=True)
            self._thread.start()

    # ---- the request path -----------------------------------------------------------------
    def hold(self, request_id: str, account_id: str, amount: int) -> None:
        """Reserve `amount` for `request_id` from this replica's lease on the account. NoCredit when
        the account cannot cover it; LedgerUnavailable when a new lease is needed and the ledger is away."""
        if amount <= 0:
            return
        if self._take(request_id, account_id, amount):
            return
        with self._account_lock(account_id):  # one renewal per account at a time
            if self._take(request_id, account_id, amount):
                return
            try:
                self._renew(account_id, amount)
            except NoCredit:
                # What this replica's own lease holds unspent may be just what is missing: return it
                # (its holds reported first) and ask once more.
                if not self._retire_current(account_id):
                    raise NoCredit(account_id, amount, 0) from None
                try:
                    self._renew(account_id, amount)
                except NoCredit as short:  # the ledger speaks of the lease; the caller of this request
                    raise NoCredit(account_id, amount, short.available) from None
            if not self._take(request_id, account_id, amount):
                raise NoCredit(account_id, amount, self._give_back_short(account_id))

    def finish(self, request_id: str, cost: int, *, billed: bool) -> None:
        """The request ended: it cost `cost` (billed: its trace will post it) or nothing (not billed: void)."""
        with self._lock:
            held = self._held.pop(request_id, None)
            if held is None:
                return
            lease = held.lease
            lease.in_flight -= 1
            lease.used -= held.amount - (min(cost, held.amount) if billed else 0)
            lease.last_used = self._clock()
            if not billed:
                if self._unreported.pop(request_id, None) is None:  # reported already: void it
                    self._unreported[request_id] = HoldItem(request_id, lease.account_id, 0, lease.lease_id, void=True)

    def _take(self, request_id: str, account_id: str, amount: int) -> bool:
        with self._lock:
            lease = self._leases.get(account_id)
            if lease is None or lease.left < amount:
                return False
            if len(self._unreported) >= UNREPORTED_MAX:
                raise LedgerUnavailable(f"{len(self._unreported)} holds are waiting for the ledger")
            lease.used += amount
            lease.in_flight += 1
            lease.last_used = self._clock()
            if lease.left < lease.granted * self.refill_below:
                self._wake.set()  # renew now, in the background
            self._held[request_id] = _Held(lease, amount)
            self._unreported[request_id] = HoldItem(request_id, account_id, amount, lease.lease_id)
            return True

    def _give_back_short(self, account_id: str) -> int:
        """A new lease too small for the request that asked for it goes straight back (a refusal
        reserves nothing); what it held, the account's available credit then."""
        with self._lock:
            lease = self._leases.get(account_id)
            if lease is None:
                return 0
            if lease.in_flight:  # a smaller request took from it meanwhile: keep it
                return lease.left
            del self._leases[account_id]
        try:
            self._return(lease)
        except LedgerUnavailable:
            pass  # it expires at the ledger
        return lease.granted

    # ---- talking to the ledger ------------------------------------------------------------
    def _account_lock(self, account_id: str) -> threading.Lock:
        with self._lock:
            return self._account_locks.setdefault(account_id, threading.Lock())

    def _drain(self) -> list[HoldItem]:
        with self._lock:
            items = list(self._unreported.values())
            self._unreported.clear()
            return items

    def _requeue(self, items: list[HoldItem]) -> None:
        """Put back what the ledger did not get, ahead of anything queued since."""
        with self._lock:
            queued = list(self._unreported.items())
            self._unreported.clear()
            self._unreported.update((item.hold_id, item) for item in items)
            self._unreported.update(queued)

    def _renew(self, account_id: str, unit: int) -> None:
        """Take a new lease on the account sized for `unit`-cost requests (called with the account's lock
        held); the old one retires: it is returned once its holds are reported. NoCredit when the
        ledger has nothing to lend."""
        self._return_retiring(account_id)  # at most two leases per account: the one spent, the one returned
        with self._lock:
            old = self._leases.get(account_id)
        unit = max(unit, old.unit if old is not None else 0)
        grant = self.ledger.lease(f"lease-{uuid.uuid4().hex}", account_id, unit * self.lease_requests, self.owner,
                                  ttl_seconds=self.lease_ttl_seconds)
        with self._lock:
            now = self._clock()
            self._leases[account_id] = _Lease(grant.lease_id, account_id, grant.granted, unit, granted_at=now,
                                              last_used=now)
            if old is not None:
                self._retiring.append(old)
        self._wake.set()  # report the old one's holds and return it soon

    def _return_retiring(self, account_id: str) -> None:
        """Report the holds and return the replaced leases of the account (account lock held)."""
        with self._lock:
            mine = [lease for lease in self._retiring if lease.account_id == account_id]
            self._retiring = [lease for lease in self._retiring if lease.account_id != account_id]
        for index, lease in enumerate(mine):
            try:
                self._return(lease)
            except LedgerUnavailable:
                with self._lock:
                    self._retiring.extend(mine[index:])
                raise

    def _retire_current(self, account_id: str) -> bool:
        """Return the account's current lease, its holds reported first (account lock held); whether
        there was one."""
        with self._lock:
            lease = self._leases.pop(account_id, None)
            if lease is not None:
                self._retiring.append(lease)
        if lease is not None:
            self._return_retiring(account_id)
        return lease is not None

    def flush(self) -> None:
        """Report the holds and voids queued so far (kept for the next try if the ledger is away)."""
        items = self._drain()
        if not items:
            return
        try:
            self._count_refused(self.ledger.report(items))
        except LedgerUnavailable:
            self._requeue(items)
            raise

    def _count_refused(self, results: tuple) -> None:  # type: ignore[type-arg]
        refused = [r for r in results if r.state == "refused"]
        if refused:
            self.refused_reports += len(refused)
            self._dealings.refused_holds.inc(len(refused))
            log.warning("the ledger refused %d hold reports, e.g. %s: %s", len(refused), refused[0].hold_id,
                        refused[0].reason)

    def tend(self) -> None:
        """One round of the background work: renew leases running low or at half their life, report the
        holds, return the leases they replaced, return idle ones."""
        now = self._clock()
        with self._lock:
            low = [lease for lease in self._leases.values() if lease.left < lease.granted * self.refill_below
                   or (now - lease.granted_at >= self.lease_ttl_seconds / 2
                       and now - lease.last_used < self.idle_return_seconds)]
        for lease in low:
            with self._account_lock(lease.account_id):
                if self._leases.get(lease.account_id) is lease:
                    try:
                        self._renew(lease.account_id, lease.unit)
                    except NoCredit:
                        pass  # the account is running dry: requests will say so
        self.flush()
        with self._lock:
            retiring = {lease.account_id for lease in self._retiring}
            idle = [lease for lease in self._leases.values()
                    if lease.in_flight == 0 and now - lease.last_used >= self.idle_return_seconds]
        for account_id in sorted(retiring):
            with self._account_lock(account_id):
                self._return_retiring(account_id)
        for lease in idle:
            with self._account_lock(lease.account_id):
                with self._lock:
                    if self._leases.get(lease.account_id) is not lease or lease.in_flight:
                        continue
                    del self._leases[lease.account_id]
                self._return(lease)

    def _return(self, lease: _Lease) -> None:
        items = self._drain()
        try:
            self._count_refused(self.ledger.return_lease(lease.lease_id, items))
        except LedgerUnavailable:
            self._requeue(items)  # the lease expires at the ledger on its own
            raise

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._leases or self._unreported or self._retiring)

    def _run(self, every_seconds: float) -> None:
        while not self._stopped.is_set():
            # Idle (no lease, nothing queued): sleep longer; a new lease wakes the thread at once.
            self._wake.wait(every_seconds if self._has_work() else IDLE_WAIT_SECONDS)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                self.tend()
            except LedgerUnavailable as away:
                log.debug("ledger away: %s", away)
            except Exception:
                log.exception("credit book round failed")

    def close(self) -> None:
        """Stop the background work, report what is queued and return every lease (best effort)."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            leases = self._retiring + list(self._leases.values())
            self._leases.clear()
            self._retiring = []
        try:
            self.flush()
            for lease in leases:
                self._return(lease)
        except LedgerUnavailable as away:
            log.warning("could not return leases to the ledger (they expire there): %s", away)
