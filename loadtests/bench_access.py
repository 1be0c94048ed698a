"""Added latency of auth + metering per request, on SQLite and PostgreSQL (goal: under 1 ms at p99).

Runs the replica's real `AccessControl` against a real ledger database, in one process, the way a
request meets it: `authenticate` (the key, cached after the first look-up as in a replica), `admit`
(rate limits, then a hold of the worst-case cost on the account) and `finish` (the hold shrunk to
the actual cost), next to the same request with auth off (the baseline: nothing to do). The ledger's
side (the hold deleted when the trace is posted) runs afterwards, outside the timed path, as it
does in production. Printed per backend: p50 / p99 / max in milliseconds, for a priced adapter
(a hold is written) and for a free one (limits only); `finish` (the hold shrunk to the actual cost)
is timed apart: it runs on a worker thread after the last token, off the request's path.

    .venv/bin/python loadtests/bench_access.py --requests 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.support (PostgreSQL)

from ledger.accounts.accounts import Accounts, release_holds  # noqa: E402
from ledger.accounts.api_keys import ApiKeys  # noqa: E402
from registry.adapters import DEFAULT_PRICE_PER_1K_TOKENS  # noqa: E402
from registry.models import Adapter  # noqa: E402
from serving.access import AccessControl  # noqa: E402
from serving.config import AccessConfig  # noqa: E402
from storage.database import open_database  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

PROMPT_TOKENS, MAX_TOKENS, COMPLETION_TOKENS = 40, 64, 64


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(url: str, requests: int) -> dict[str, list[float]]:
    engine = open_database(url)
    from sqlmodel import Session

    with Session(engine) as session:
        session.add(Adapter(name="priced", base_model="base", uri="file:///dev/null", owner="0x" + "11" * 20,
                            price_per_1k_tokens=str(DEFAULT_PRICE_PER_1K_TOKENS), source="registered"))
        session.commit()
    Accounts(engine).create("bench")
    Accounts(engine).credit("bench", DEFAULT_PRICE_PER_1K_TOKENS * 10**9, "bench-credit")
    key = ApiKeys(engine).create("bench").presented
    access = AccessControl(engine, AccessConfig(rate_requests_per_second=10**9, rate_tokens_per_minute=10**12,
                                                key_cache_seconds=60))
    off = AccessControl(engine, AccessConfig(auth=False))
    header = f"Bearer {key}"
    access.authenticate(header)  # the first look-up reads the database; replicas then cache it
    timings: dict[str, list[float]] = {"priced": [], "free": [], "auth off": [], "finish": []}
    finished: list[str] = []
    for i in range(requests):
        for label, control, adapter in (("priced", access, "priced"), ("free", access, None),
                                        ("auth off", off, "priced")):
            request_id = f"{label}-{i}"
            start = time.perf_counter()
            caller = control.authenticate(header)
            admission = control.admit(caller, request_id, adapter, PROMPT_TOKENS, MAX_TOKENS)
            admitted = time.perf_counter()
            control.finish(admission, PROMPT_TOKENS, COMPLETION_TOKENS, billed=True)
            timings[label].append((admitted - start) * 1000)
            if label == "priced":  # after the last token, on a worker thread: not on the request's path
                timings["finish"].append((time.perf_counter() - admitted) * 1000)
            if admission is not None and admission.held:
                finished.append(request_id)
        if len(finished) >= 64:  # what the ledger does when it posts these traces (not timed)
            from sqlmodel import Session

            with Session(engine) as session:
                release_holds(session, finished)
                session.commit()
            finished.clear()
    Accounts(engine).check("bench")
    engine.dispose()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    backends = {"SQLite": None, "PostgreSQL": None}
    with tempfile.TemporaryDirectory() as scratch:
        backends["SQLite"] = f"sqlite:///{Path(scratch) / 'ledger.db'}"
        server = None
        if not args.no_postgres:
            server = PostgresServer(free_port()).start()
            backends["PostgreSQL"] = server.create_database("bench")
        try:
            print(f"auth + metering per request ({args.requests} requests; {PROMPT_TOKENS} prompt + {MAX_TOKENS} "
                  "max tokens), milliseconds")
            print(f"{'backend':<11} {'path':<9} {'p50':>7} {'p99':>7} {'max':>7} {'mean':>7}")
            for name, url in backends.items():
                if url is None:
                    continue
                for label, values in measure(url, args.requests).items():
                    print(f"{name:<11} {label:<9} {percentile(values, 0.5):7.3f} {percentile(values, 0.99):7.3f} "
                          f"{max(values):7.3f} {statistics.fmean(values):7.3f}")
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
