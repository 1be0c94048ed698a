"""Ledger ingest rate on SQLite and PostgreSQL next to each database's raw insert rate, and the
latency that trace shipping adds to requests — measured side by side in one run.

Part 1, per backend: a registry with one published datanet (20 contributors, 200 contributions) and
a priced adapter; a real `gateway ledger serve` process; N traces of 64 completion tokens (1–2
contributions per token) sent over one `Ingest` stream in batches of 64 with 4 batches in flight.
Printed: traces/s and attributed tokens/s. Then, on the same database, the raw insert rate of the
same rows (a trace row, a journal entry and as many postings per trace as the ingest wrote, 64
traces per transaction, written by the ledger's own `write_traces` without any check, decoding or
hashing) — what the database takes with the ledger's statements.

Part 2: two gateways on one state directory, shipping on and off (`GATEWAY_LEDGER_SHIP=false`),
alternate rounds of the serving workload on the demo lineage adapters; TTFT/ITL p50 and p99.

    .venv/bin/python loadtests/bench_ledger.py --traces 20000            # both parts
    .venv/bin/python loadtests/bench_ledger.py --traces 20000 --no-latency
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from eth_account import Account  # noqa: E402
from sqlmodel import Session  # noqa: E402

from gateway.ledger_process import LedgerProcess  # noqa: E402
from ledger.client.trace import AttributionTrace, TokenAttribution  # noqa: E402
from ledger.client.trace_wire import canonical_json, content_sha256, trace_to_pb  # noqa: E402
from ledger.journal.fee_split import Share  # noqa: E402
from ledger.journal.rows import TraceRow, write_traces  # noqa: E402
from registry.adapters import AdapterRegistry  # noqa: E402
from registry.config import DatanetConfig  # noqa: E402
from registry.contribution_content import content_id, normalize, sign_contribution  # noqa: E402
from registry.datanets import DatanetRegistry, SignedText  # noqa: E402
from storage.database import open_database, utcnow  # noqa: E402
from tests.support.ports import NO_CHAIN, free_port  # noqa: E402
from tests.support.memory_anchor import MemoryAnchor, listing_index  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc  # noqa: E402

CONTRIBUTORS = 20
CONTRIBUTIONS = 200
COMPLETION_TOKENS = 64
BATCH = 64
WINDOW = 4
ADAPTER = "bench-adapter"


def log(message: str) -> None:
    print(f"[bench-ledger] {message}", file=sys.stderr, flush=True)


def populate(url: str, index_root: Path) -> list[str]:
    """One datanet of CONTRIBUTIONS texts by CONTRIBUTORS accounts, published; a priced adapter on it."""
    engine = open_database(url)
    registry = DatanetRegistry(engine, DatanetConfig())
    datanet = registry.create("bench")
    accounts = [Account.from_key(bytes([i + 1]) * 32) for i in range(CONTRIBUTORS)]
    items = []
    for i in range(CONTRIBUTIONS):
        text = f"Benchmark passage {i}: " + " ".join(f"word{(i * 7 + j) % 997}x{i}" for j in range(30))
        account = accounts[i % CONTRIBUTORS]
        signature = sign_contribution(account.key, datanet.id, content_id(normalize(text)))
        items.append(SignedText("bench", text, account.address, signature))
    accepted = registry.contribute("bench", items).accepted
    registry.publish("bench", listing_index, MemoryAnchor(), index_root)
    adapters = AdapterRegistry(engine, registry)
    adapters.register(ADAPTER, uri="file:///bench", base_model="tiny", owner=accounts[0].address,
                      price_per_1k_tokens=10**15, lineage=adapters.resolve_lineage(["bench"]), source="registered")
    engine.dispose()
    return [a.id for a in accepted]


def make_traces(count: int, contribution_ids: list[str], seed: int = 0) -> list[AttributionTrace]:
    rng = random.Random(seed)
    traces = []
    for _ in range(count):
        tokens = []
        for _ in range(COMPLETION_TOKENS):
            picked = rng.sample(contribution_ids, rng.choice((1, 2)))
            weights = tuple((cid, 0.45) for cid in picked)
            tokens.append(TokenAttribution(rng.randrange(8192), weights, 1.0 - 0.45 * len(picked)))
        traces.append(AttributionTrace(uuid.uuid4().hex, ADAPTER, ADAPTER, None, 20, COMPLETION_TOKENS,
                                       tuple(tokens), "verbatim-span-v1"))
    return traces


def ingest_rate(target: str, traces: list[AttributionTrace], metadata: tuple[tuple[str, str], ...],
                per_request: bool = True) -> tuple[float, int]:
    """Seconds to have every trace acknowledged over one stream; the number accepted. With `per_request`
    the requests ask for one ack message each (`ack_per_request`, as the shipper does), else one per trace."""
    messages = [trace_to_pb(t) for t in traces]
    batches = [ledger_pb2.IngestRequest(traces=messages[i:i + BATCH], ack_per_request=per_request)
               for i in range(0, len(messages), BATCH)]
    import queue
    import threading

    sent: queue.Queue = queue.Queue()
    credits = threading.Semaphore(WINDOW)

    def requests():  # type: ignore[no-untyped-def]
        for batch in batches:
            credits.acquire()
            sent.put(len(batch.traces))
            yield batch

    accepted = 0
    with grpc.insecure_channel(target) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        started = time.perf_counter()
        remaining_in_batch = 0
        for message in stub.Ingest(requests(), timeout=3600, metadata=metadata):
            for ack in message.acks or (message,):
                if remaining_in_batch == 0:
                    remaining_in_batch = sent.get()
                remaining_in_batch -= 1
                if remaining_in_batch == 0:
                    credits.release()
                accepted += ack.status == ledger_pb2.IngestAck.STATUS_ACCEPTED
        return time.perf_counter() - started, accepted


def raw_insert_rate(url: str, traces: list[AttributionTrace], postings_per_trace: int) -> float:
    """Seconds to insert the same rows with the ledger's own write (`write_traces`: three multi-row
    statements per batch), 64 traces per transaction, without any check.

    The rows (canonical JSON, hashes) are built before the clock starts: this is the database alone.
    """
    engine = open_database(url)
    shares = [Share(f"payable:0x{i:040x}", "contributor", 10**15) for i in range(postings_per_trace)]
    rows = [TraceRow(trace_id=f"raw-{t.trace_id}", content_sha256=content_sha256(t), model=t.model, adapter=t.adapter,
                     requester=None, prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
                     attributed_tokens=30.0, price_per_1k_tokens=10**15, fee=84 * 10**12,
                     body=canonical_json(t).decode(), shares=shares) for t in traces]
    started = time.perf_counter()
    with Session(engine) as session:
        for start in range(0, len(rows), BATCH):
            write_traces(session, rows[start:start + BATCH], utcnow(), kind="raw")
            session.commit()
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def bench_backend(name: str, url: str, state: Path, count: int, per_request: bool) -> dict[str, float]:
    log(f"{name}: populating the registry")
    contribution_ids = populate(url, state / "indexes")
    traces = make_traces(count, contribution_ids)
    attributed = sum(t.attributed_fraction * t.completion_tokens for t in traces)
    ledger = LedgerProcess(state, "127.0.0.1", free_port(), env={"DATABASE_URL": url, **NO_CHAIN},
                           log_file=state / "ledger.log").start()
    try:
        log(f"{name}: ingesting {count} traces through `gateway ledger serve`")
        seconds, accepted = ingest_rate(ledger.target, traces, ledger.metadata, per_request)
        with grpc.insecure_channel(ledger.target) as channel:
            totals = ledger_pb2_grpc.LedgerStub(channel).GetTotals(ledger_pb2.GetTotalsRequest(), timeout=60,
                                                                   metadata=ledger.metadata)
    finally:
        ledger.stop()
    assert accepted == count, f"{accepted} of {count} accepted"
    assert totals.postings_sum == "0" and totals.unbalanced_entries == 0
    postings_per_trace = round(totals.postings / totals.traces)
    log(f"{name}: raw inserts of the same rows ({postings_per_trace} postings per trace)")
    raw_seconds = raw_insert_rate(url, make_traces(count, contribution_ids, seed=1), postings_per_trace)
    return {"traces_s": count / seconds, "attributed_tokens_s": attributed / seconds, "raw_traces_s": count / raw_seconds,
            "postings_per_trace": postings_per_trace}


def shipping_on_and_off(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Medians per gateway of alternating rounds: shipping on, shipping off."""
    from bench_attribution_overhead import alternate_gateways

    state = Path(tempfile.mkdtemp(prefix="bench-ledger-", dir="/tmp"))
    rounds = alternate_gateways(state, {"shipping on": {}, "shipping off": {"GATEWAY_LEDGER_SHIP": "false"}}, args)
    keys = ("tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")
    return {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in rounds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=20_000)
    parser.add_argument("--no-ingest", action="store_true", help="skip part 1 (ingest rates)")
    parser.add_argument("--no-latency", action="store_true", help="skip part 2 (two gateways, a few minutes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=18400, help="first of four ports for part 2")
    parser.add_argument("--backends", default="sqlite,postgresql", help="part 1's databases (comma-separated)")
    parser.add_argument("--acks", choices=("per-request", "per-trace"), default="per-request",
                        help="part 1: one ack message per request (ack_per_request) or one per trace")
    args = parser.parse_args()

    if not args.no_ingest:
        ingest(args)
    if not args.no_latency:
        request_latency(args)
    return 0


def ingest(args: argparse.Namespace) -> None:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as scratch:
        backends = args.backends.split(",")
        per_request = args.acks == "per-request"
        if "sqlite" in backends:
            results["SQLite"] = bench_backend("SQLite", f"sqlite:///{scratch}/sqlite/ledger.db",
                                              Path(scratch) / "sqlite", args.traces, per_request)
        if "postgresql" in backends:
            postgres = PostgresServer(free_port()).start()
            try:
                url = postgres.create_database("bench")
                results["PostgreSQL"] = bench_backend("PostgreSQL", url, Path(scratch) / "pg", args.traces,
                                                      per_request)
            finally:
                postgres.stop()
    print(f"ingest of {args.traces} traces x {COMPLETION_TOKENS} tokens (batches of {BATCH}, {WINDOW} in flight, "
          f"acks {args.acks}), next to raw inserts of the same rows:")
    print(f"{'':12}{'traces/s':>10}{'attributed tok/s':>18}{'raw inserts/s':>15}{'ingest/raw':>12}")
    for name, r in results.items():
        print(f"{name:12}{r['traces_s']:>10.0f}{r['attributed_tokens_s']:>18.0f}{r['raw_traces_s']:>15.0f}"
              f"{r['traces_s'] / r['raw_traces_s']:>12.2f}")


def request_latency(args: argparse.Namespace) -> None:
    figures = shipping_on_and_off(args)
    print(f"\nrequests with trace shipping on vs off (medians of {args.rounds} rounds, {args.requests} x 64-token "
          f"streams, {args.concurrency} in flight):")
    print(f"{'':14}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  (ms)")
    for name, f in figures.items():
        print(f"{name:14}{f['tok_s']:>8.1f}{f['ttft_p50']:>10.1f}{f['ttft_p99']:>10.1f}{f['itl_p50']:>9.2f}"
              f"{f['itl_p99']:>9.2f}")
    on, off = figures["shipping on"], figures["shipping off"]
    print(f"on/off: TTFT p99 {on['ttft_p99'] / off['ttft_p99']:.3f}, ITL p99 {on['itl_p99'] / off['itl_p99']:.3f}, "
          f"tok/s {on['tok_s'] / off['tok_s']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
