"""Added latency of auth + metering per request, on SQLite and PostgreSQL (goal: under 1 ms at p99).

Runs the replica's real `AccessControl` the way a request meets it, against the ledger's real
Access API: `gateway ledger serve` as its own process on each backend, reached over gRPC as an
engine replica reaches it. Timed per request: `authenticate` (the key, cached after the first
look-up as in a replica) and `admit` (rate limits from the key's chunk, then a hold of the
worst-case cost from the replica's credit lease), next to the same request with auth off (the
baseline: nothing to do). `finish` (the unused part back to the lease) is timed apart: it runs
after the last token, off the request's path. The background thread reports holds to the ledger
and renews the lease while the loop runs, as in a replica. Printed per backend: p50 / p99 / max /
mean in milliseconds for a priced adapter (a hold) and a free one (limits only), and how many
leases the ledger granted. Requests are paced (`--rate`, 500 priced requests per second by default:
far above what an engine on these cores serves), as a replica receives them; `--rate 1e9` is a
tight loop, which outruns the background renewal of leases.

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

from gateway.ledger_process import LedgerProcess  # noqa: E402
from ledger.accounts.accounts import Accounts  # noqa: E402
from ledger.accounts.api_keys import ApiKeys  # noqa: E402
from ledger.accounts.transfers import LEASE, Transfers  # noqa: E402
from ledger.client.access import LedgerAccessClient  # noqa: E402
from registry.adapters import DEFAULT_PRICE_PER_1K_TOKENS  # noqa: E402
from registry.models import Adapter  # noqa: E402
from serving.access import AccessControl  # noqa: E402
from serving.config import AccessConfig  # noqa: E402
from storage.database import open_database  # noqa: E402
from tests.support.ports import NO_CHAIN, free_port  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

TOKEN = "bench-access-token-0123456789"
PROMPT_TOKENS, MAX_TOKENS, COMPLETION_TOKENS = 40, 64, 64


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(url: str, requests: int, state: Path, rate: float) -> tuple[dict[str, list[float]], int]:
    engine = open_database(url)
    from sqlmodel import Session

    with Session(engine) as session:
        session.add(Adapter(name="priced", base_model="base", uri="file:///dev/null", owner="0x" + "11" * 20,
                            price_per_1k_tokens=str(DEFAULT_PRICE_PER_1K_TOKENS), source="registered"))
        session.commit()
    Accounts(engine).create("bench")
    Accounts(engine).credit("bench", DEFAULT_PRICE_PER_1K_TOKENS * 10**9, "bench-credit")
    key = ApiKeys(engine).create("bench").presented
    env = {"GATEWAY_LEDGER_TOKEN": TOKEN, "DATABASE_URL": url, "GATEWAY_LEDGER_METRICS_PORT": str(free_port()),
           **NO_CHAIN}
    ledger = LedgerProcess(state, "127.0.0.1", free_port(), env=env, log_file=state / "ledger.log").start()
    client = LedgerAccessClient(ledger.target, TOKEN)
    config = AccessConfig(rate_requests_per_second=10**9, rate_tokens_per_minute=10**12, key_cache_seconds=60)
    access = AccessControl(client, config, "bench-replica")
    off = AccessControl(client, AccessConfig(auth=False), "bench-replica-off")
    header = f"Bearer {key}"
    try:
        access.authenticate(header)  # the first look-up asks the ledger; replicas then cache it
        timings: dict[str, list[float]] = {"priced": [], "free": [], "auth off": [], "finish": []}
        next_at = time.perf_counter()
        for i in range(requests):
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.perf_counter()))  # paced: not timed
            for label, control, adapter in (("priced", access, "priced"), ("free", access, None),
                                            ("auth off", off, "priced")):
                start = time.perf_counter()
                caller = control.authenticate(header)
                admission = control.admit(caller, f"{label}-{i}", adapter, PROMPT_TOKENS, MAX_TOKENS)
                admitted = time.perf_counter()
                control.finish(admission, PROMPT_TOKENS, COMPLETION_TOKENS, billed=True)
                timings[label].append((admitted - start) * 1000)
                if label == "priced":  # after the last token: not on the request's path
                    timings["finish"].append((time.perf_counter() - admitted) * 1000)
        access.close()
        off.close()
        leases = sum(1 for t in Transfers(engine).list("bench") if t.kind == LEASE)
        Transfers(engine).check("bench")
        Accounts(engine).check("bench")
    finally:
        client.close()
        ledger.stop()
        engine.dispose()
    return timings, leases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--rate", type=float, default=500.0,
                        help="priced requests per second (each with a free and an auth-off one): far above what "
                             "these cores serve (~10-30/s), so leases are renewed as often as they would be")
    args = parser.parse_args()
    backends = {"SQLite": None, "PostgreSQL": None}
    with tempfile.TemporaryDirectory() as scratch:
        backends["SQLite"] = f"sqlite:///{Path(scratch) / 'ledger.db'}"
        server = None
        if not args.no_postgres:
            server = PostgresServer(free_port()).start()
            backends["PostgreSQL"] = server.create_database("bench")
        try:
            print(f"auth + metering per request ({args.requests} requests at {args.rate:g}/s; {PROMPT_TOKENS} prompt + "
                  f"{MAX_TOKENS} max tokens), milliseconds")
            print(f"{'backend':<11} {'path':<9} {'p50':>7} {'p99':>7} {'max':>7} {'mean':>7}")
            for name, url in backends.items():
                if url is None:
                    continue
                state = Path(scratch) / name
                state.mkdir()
                timings, leases = measure(url, args.requests, state, args.rate)
                for label, values in timings.items():
                    print(f"{name:<11} {label:<9} {percentile(values, 0.5):7.3f} {percentile(values, 0.99):7.3f} "
                          f"{max(values):7.3f} {statistics.fmean(values):7.3f}")
                print(f"{name:<11} leases granted by the ledger: {leases} for {args.requests} priced requests")
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
