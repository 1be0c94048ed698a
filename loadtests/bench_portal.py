"""Portal first render: each page's first and later render times on the demo datanet and on a 100k datanet.

The issue's target: every page's first render under 300 ms on the demo data and under 1 s with 100k
contributions. This measures it; it asserts nothing (each row says PASS or MISS).

Data (built once in `--work-dir`, reused by later runs: each step is skipped when already done):

* a state directory whose database holds
  - the demo datanet `python-docs-notes` (12 passages by 4 contributors), contributed through
    `DatanetRegistry.contribute` with real signatures and published (`MemoryAnchor`, a listing index);
  - `bench-large`: `--contributions` distinct synthetic passages (~40 words, seeded) from
    `--contributors` addresses, bulk-inserted with SQLAlchemy core in transactions of 10k rows.
    Their ids are real (sha256 of the normalized text); their signature is one fixed placeholder
    and their MinHash is empty (no band rows): nothing here reads either. Version 1 is inserted
    directly, with the real Merkle root (registry/merkle.py) and a fake anchor transaction;
  - one registered adapter with lineage on each datanet's version;
* in the ledger (`gateway ledger serve`, as a child process): an account with an API key created
  through the Admin API, and traces ingested through the gRPC Ingest API under that key, crediting
  contributions of both datanets (so contributor pages have balances and statement lines, and the
  datanet pages have usage).

Measurement: the portal is served the real way (`gateway.portal_pages.start_portal` with port 0, in
a child process of its own: `python loadtests/bench_portal.py --serve`, which only adds a line on
stdout when the background Merkle-tree warm-up ends). Right after a portal answers, each page kind
is requested once, in a fixed order (the *first render*: cold caches, including the 100k-leaf tree
unless the warm-up got there first, which each row reports); this is done with `--starts` fresh
portals, each a first start (the Merkle trees earlier portals saved in `<state>/cache/merkle/` are
removed before it; median and worst are printed, the verdict is on the worst). The first portal then serves
`--repeats` more requests of each page (interleaved) for the median and p95. Last, fresh portals
each get one request the moment they are ready: the 100k contributor page, then (other portals) the
100k contribution page; on a first start the tree is built by that request or by the warm-up it waits
for, on a restart it is read back from the file the first start saved.
Times are complete responses (body read) from an httpx client on loopback; signing in (for the
trace pages) is not timed. Pages that belong to no datanet (the list, the error page, sign-in) are
held to the 1 s target: the database they read holds the 100k.

    flock -x /tmp/quiet.lock .venv/bin/python loadtests/bench_portal.py
    .venv/bin/python loadtests/bench_portal.py --work-dir /tmp/bench-portal --contributions 100000 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ledger.client.trace import AttributionTrace, TokenAttribution  # noqa: E402

os.environ.setdefault("GATEWAY_BASE_MODEL", "datanet-tiny-llama")  # only the tiny tokenizer is needed

DEMO_TARGET_MS = 300.0
LARGE_TARGET_MS = 1000.0
LARGE = "bench-large"
INSERT_CHUNK = 10_000
PLACEHOLDER_SIGNATURE = "0x" + "00" * 65
ACCOUNT = "bench-reader"
TRACES_PER_DATANET = 4
TRACE_TOKENS = 48


def log(message: str) -> None:
    print(f"[bench-portal] {message}", file=sys.stderr, flush=True)


# ---- the data ----------------------------------------------------------------------------------


def synthetic_text(i: int, rng: random.Random, vocabulary: list[str]) -> str:
    return f"Passage {i}: " + " ".join(rng.choice(vocabulary) for _ in range(rng.randint(35, 45))) + "."


def build_registry(state: Path, contributions: int, contributors: int) -> dict:
    """The two datanets and their adapters (each step skipped when done); what the pages will be asked for."""
    from sqlalchemy import insert
    from sqlmodel import Session, func, select

    from gateway.config import GatewayConfig
    from gateway.demo_data import DEMO_CONTRIBUTOR_KEYS, demo_contributor_address
    from registry.adapters import DEFAULT_PRICE_PER_1K_TOKENS, AdapterRegistry
    from registry.config import DatanetConfig
    from registry.contribution_content import address_of_key, content_id, normalize, sign_contribution
    from registry.datanets import DatanetRegistry, SignedText
    from registry.errors import NotFound
    from registry.merkle import MerkleTree
    from registry.models import Contribution, DatanetVersion
    from storage.database import database_url, open_database, utcnow
    from tests.support.memory_anchor import MemoryAnchor, listing_index
    from training.demo_assets import build_tokenizer
    from training.demo_passages import DEMO_DATANETS

    config = GatewayConfig(state_dir=state)
    started = time.perf_counter()
    if not (config.model_path / "tokenizer.json").exists():
        build_tokenizer(config.model_path)  # all the portal reads of the model (ensure_base_model builds the rest)
    log(f"tiny model's tokenizer at {config.model_path} ({time.perf_counter() - started:.1f} s)")
    engine = open_database(database_url(state))
    registry = DatanetRegistry(engine, DatanetConfig(max_bytes_per_contributor_per_day=10**12))
    adapters = AdapterRegistry(engine, registry)
    owner = address_of_key("0x" + "55" * 32)

    # the demo datanet, the way `gateway up` builds it (real signatures), published with a stand-in anchor
    demo = DEMO_DATANETS[0]
    try:
        record = registry.get(demo.name)
    except NotFound:
        record = registry.create(demo.name, demo.description)
    if not registry.versions(demo.name):
        items = [SignedText(f"demo:{i}", p.text, demo_contributor_address(p.contributor_index),
                            sign_contribution(DEMO_CONTRIBUTOR_KEYS[p.contributor_index], record.id,
                                              content_id(normalize(p.text))))
                 for i, p in enumerate(demo.passages)]
        registry.contribute(demo.name, items)
        registry.publish(demo.name, listing_index, MemoryAnchor(), state / "indexes")
        log(f"demo datanet '{demo.name}': {len(items)} contributions published")
    if not adapters.is_registered("demo-lora"):
        adapters.register("demo-lora", uri="file:///bench/demo-lora", base_model="datanet-tiny-llama", owner=owner,
                          price_per_1k_tokens=DEFAULT_PRICE_PER_1K_TOKENS,
                          lineage=adapters.resolve_lineage([demo.name]), source="registered")

    # the large datanet: bulk rows, then version 1 with the real root
    try:
        large = registry.get(LARGE)
    except NotFound:
        large = registry.create(LARGE, f"{contributions} synthetic passages for loadtests/bench_portal.py")
    addresses = [address_of_key(f"0x{i + 1:064x}") for i in range(contributors)]
    with Session(engine) as session:
        have = session.exec(select(func.count()).select_from(Contribution)
                            .where(Contribution.datanet_id == large.id)).one()
    if have < contributions:
        rng = random.Random(20261204)
        vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                      for _ in range(3000)]
        base = utcnow() - timedelta(days=30)
        table = Contribution.__table__
        started = time.perf_counter()
        for start in range(0, contributions, INSERT_CHUNK):
            rows = []
            for i in range(start, min(start + INSERT_CHUNK, contributions)):
                text = normalize(synthetic_text(i, rng, vocabulary))  # drawn for every i: the same texts each run
                if i < have:
                    continue
                rows.append({"id": content_id(text), "datanet_id": large.id, "contributor": addresses[i % contributors],
                             "signature": PLACEHOLDER_SIGNATURE, "license": "CC-BY-4.0",
                             "bytes": len(text.encode()), "text": text, "minhash": b"", "status": "published",
                             "version": 1, "source": f"bench:{i}", "created_at": base + timedelta(milliseconds=i)})
            if rows:
                with engine.begin() as connection:
                    connection.execute(insert(table), rows)
            log(f"'{LARGE}': {min(start + INSERT_CHUNK, contributions)}/{contributions} contributions "
                f"({time.perf_counter() - started:.1f} s)")
    with Session(engine) as session:
        version = session.exec(select(DatanetVersion).where(DatanetVersion.datanet_id == large.id)).first()
        if version is None:
            ids = session.exec(select(Contribution.id).where(Contribution.datanet_id == large.id)).all()
            started = time.perf_counter()
            tree = MerkleTree.from_ids([bytes.fromhex(i) for i in ids])
            anchor = MemoryAnchor()
            session.add(DatanetVersion(
                datanet_id=large.id, number=1, merkle_root="0x" + tree.root.hex(), contribution_count=len(ids),
                index_path=str(state / "indexes" / large.id / "v1"), anchor_tx="0x" + hashlib.sha256(
                    tree.root).hexdigest(), anchor_chain_id=anchor.chain_id, anchor_contract=anchor.address,
                published_at=utcnow()))
            session.commit()
            log(f"'{LARGE}' version 1: {len(ids)} leaves, root 0x{tree.root.hex()[:16]}… "
                f"({time.perf_counter() - started:.1f} s)")
    if not adapters.is_registered("large-lora"):
        adapters.register("large-lora", uri="file:///bench/large-lora", base_model="datanet-tiny-llama", owner=owner,
                          price_per_1k_tokens=DEFAULT_PRICE_PER_1K_TOKENS, lineage=adapters.resolve_lineage([LARGE]),
                          source="registered")

    with Session(engine) as session:
        demo_contributor = demo_contributor_address(0)
        demo_ids = session.exec(select(Contribution.id).where(Contribution.datanet_id == record.id)
                                .order_by(Contribution.id)).all()
        demo_own = session.exec(select(Contribution.id).where(Contribution.contributor == demo_contributor)
                                .order_by(Contribution.id)).all()
        large_contributor = addresses[0]
        large_own = session.exec(select(Contribution.id).where(Contribution.contributor == large_contributor)
                                 .order_by(Contribution.id).limit(20)).all()
        large_others = session.exec(select(Contribution.id).where(Contribution.datanet_id == large.id)
                                    .order_by(Contribution.created_at.desc()).limit(50)).all()
    engine.dispose()
    return {"demo": {"datanet": demo.name, "contributor": demo_contributor, "contribution": demo_own[0],
                     "own": list(demo_own), "all": list(demo_ids)},
            "large": {"datanet": LARGE, "contributor": large_contributor, "contribution": large_own[0],
                      "own": list(large_own), "all": list(large_others)}}


def make_trace(trace_id: str, adapter: str, requester: str, own: list[str], others: list[str],
               seed: int) -> AttributionTrace:
    """TRACE_TOKENS tokens, each credited to one of `own` and one of `others` (every sixth: nobody)."""

    rng = random.Random(seed)
    tokens = []
    for n in range(TRACE_TOKENS):
        if n % 6 == 5:
            tokens.append(TokenAttribution(rng.randrange(10, 500), (), 1.0))
            continue
        picked = [rng.choice(own), rng.choice(others)]
        weights = tuple((cid, 0.45) for cid in dict.fromkeys(picked))
        tokens.append(TokenAttribution(rng.randrange(10, 500), weights, 1.0 - 0.45 * len(weights)))
    return AttributionTrace(trace_id, adapter, adapter, requester, 16, TRACE_TOKENS, tuple(tokens), "verbatim-span-v1")


def build_ledger(state: Path, ledger, manifest: dict) -> dict:  # type: ignore[no-untyped-def]
    """An account and its API key (Admin API), and traces ingested under it (Ingest API)."""
    import grpc

    from ledger.client.admin import admin_client
    from ledger.client.token import bearer_metadata
    from ledger.client.trace_wire import trace_to_pb
    from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

    with admin_client(state, None, ledger.target) as client:
        admin_key = client.bootstrap_local_key().path.read_text().strip()
    with admin_client(state, admin_key, ledger.target) as admin:
        admin.create_account(ACCOUNT)
        key = admin.create_key(ACCOUNT, name="bench")
    traces = []
    for kind, adapter in (("demo", "demo-lora"), ("large", "large-lora")):
        part = manifest[kind]
        ids = []
        for n in range(TRACES_PER_DATANET):
            trace_id = f"bench-{kind}-{n}"
            traces.append(make_trace(trace_id, adapter, key.key.id, part["own"], part["all"], seed=n))
            ids.append(trace_id)
        part["trace"] = ids[0]
    with grpc.insecure_channel(ledger.target) as channel:
        acks = list(ledger_pb2_grpc.LedgerStub(channel).Ingest(
            iter([ledger_pb2.IngestRequest(traces=[trace_to_pb(t) for t in traces])]), timeout=120,
            metadata=bearer_metadata(ledger.token)))
    statuses = [a.status for message in acks for a in (message.acks or (message,))]
    accepted = sum(s == ledger_pb2.IngestAck.STATUS_ACCEPTED for s in statuses)
    if accepted != len(traces):
        raise RuntimeError(f"the ledger accepted {accepted} of {len(traces)} traces: {statuses}")
    log(f"ledger: account '{ACCOUNT}', key {key.key.id}, {len(traces)} traces ingested")
    return {"api_key": key.presented, "key_id": key.key.id}


# ---- the portal, in a child process ------------------------------------------------------------


def serve(state: Path) -> None:
    """`--serve`: the portal of `state` as `gateway portal --port 0` starts it; prints READY <url>, and WARM <s>
    when the background warm-up of the Merkle trees has finished. Runs until stdin closes."""
    started = time.perf_counter()
    from gateway.config import GatewayConfig
    from gateway.portal_pages import start_portal
    from portal.config import PortalConfig
    from portal.registry_view import RegistryView

    warm = RegistryView.warm

    def reported_warm(self: RegistryView) -> None:
        began = time.perf_counter()
        warm(self)
        print(f"WARM {time.perf_counter() - began:.3f}", flush=True)

    RegistryView.warm = reported_warm  # type: ignore[method-assign]
    server = start_portal(GatewayConfig(state_dir=state), PortalConfig(port=0))
    print(f"READY {server.url} {time.perf_counter() - started:.3f}", flush=True)
    sys.stdin.read()
    server.stop()


@dataclass
class Portal:
    process: subprocess.Popen
    url: str
    start_seconds: float
    warm_done: threading.Event
    warm_seconds: list

    def stop(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_child_portal(state: Path, env: dict[str, str]) -> Portal:
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(state)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    ready: dict = {}
    got_ready = threading.Event()
    warm_done = threading.Event()
    warm_seconds: list = []

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            if line.startswith("READY "):
                _, url, seconds = line.split()
                ready.update(url=url, seconds=float(seconds))
                got_ready.set()
            elif line.startswith("WARM "):
                warm_seconds.append(float(line.split()[1]))
                warm_done.set()
        got_ready.set()

    threading.Thread(target=read, daemon=True).start()
    got_ready.wait(120)
    if "url" not in ready:
        process.kill()
        raise RuntimeError("the portal did not start (its output is above)")
    return Portal(process, ready["url"], ready["seconds"], warm_done, warm_seconds)


# ---- the measurement ---------------------------------------------------------------------------


@dataclass
class PageKind:
    name: str
    scope: str  # demo | large | all
    path: str
    status: int
    signed_in: bool = False

    @property
    def target_ms(self) -> float:
        return DEMO_TARGET_MS if self.scope == "demo" else LARGE_TARGET_MS


def page_kinds(manifest: dict) -> list[PageKind]:
    kinds = [PageKind("datanets list", "all", "/datanets", 200)]
    for scope, part in (("demo", manifest["demo"]), ("large", manifest["large"])):
        kinds += [PageKind("datanet", scope, f"/datanets/{part['datanet']}", 200),
                  PageKind("contributor", scope, f"/contributors/{part['contributor']}", 200),
                  PageKind("contribution", scope, f"/contributions/{part['contribution']}", 200)]
    kinds += [PageKind("error (404)", "all", "/datanets/no-such-datanet", 404),
              PageKind("sign-in", "all", "/sign-in", 200)]
    for scope, part in (("demo", manifest["demo"]), ("large", manifest["large"])):
        kinds.append(PageKind("trace (signed in)", scope, f"/traces/{part['trace']}", 200, signed_in=True))
    return kinds


def timed_get(client, path: str, status: int) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    reply = client.get(path)
    elapsed = (time.perf_counter() - started) * 1000
    if reply.status_code != status:
        raise RuntimeError(f"GET {path}: {reply.status_code}, expected {status}: {reply.text[:300]}")
    return elapsed


def sign_in(client, api_key: str) -> None:  # type: ignore[no-untyped-def]
    import re

    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/sign-in").text).group(1)  # type: ignore[union-attr]
    reply = client.post("/sign-in/key", data={"key": api_key, "csrf": token}, follow_redirects=False)
    if reply.status_code != 303:
        raise RuntimeError(f"sign-in with the bench key refused: {reply.status_code}")


def first_renders(state: Path, env: dict[str, str], manifest: dict, kinds: list[PageKind],
                  repeats: int) -> tuple[dict, dict[str, list[float]]]:
    """One fresh portal: each page's first request (ms, and whether the warm-up had finished when it was sent),
    then `repeats` later requests of each (interleaved; none when 0)."""
    import httpx

    portal = start_child_portal(state, env)
    log(f"portal at {portal.url} (ready {portal.start_seconds:.2f} s after spawn): first renders")
    try:
        with httpx.Client(base_url=portal.url, timeout=120) as client:
            first: dict[str, tuple[float, bool]] = {}
            signed_in = False
            for kind in kinds:
                if kind.signed_in and not signed_in:
                    sign_in(client, manifest["api_key"])  # not timed
                    signed_in = True
                warm_before = portal.warm_done.is_set()
                first[kind.path] = (timed_get(client, kind.path, kind.status), warm_before)
            if repeats:
                log(f"{repeats} later renders of each of {len(kinds)} pages")
            later: dict[str, list[float]] = {kind.path: [] for kind in kinds}
            for _ in range(repeats):
                for kind in kinds:
                    later[kind.path].append(timed_get(client, kind.path, kind.status))
        portal.warm_done.wait(30)
        return {"start_seconds": portal.start_seconds, "warm_up_seconds": (portal.warm_seconds or [None])[0],
                "first": first}, later
    finally:
        portal.stop()


def immediately(state: Path, env: dict[str, str], kind: PageKind) -> tuple[float, bool]:
    """A fresh portal asked for one page the moment it is ready."""
    import httpx

    fresh = start_child_portal(state, env)
    try:
        with httpx.Client(base_url=fresh.url, timeout=120) as client:
            warm_before = fresh.warm_done.is_set()
            return timed_get(client, kind.path, kind.status), warm_before
    finally:
        fresh.stop()


def forget_trees(state: Path) -> None:
    """Remove the Merkle trees earlier portals saved (`<state>/cache/merkle/`): the next start is a first start."""
    import shutil

    from statedir.layout import StateLayout

    shutil.rmtree(StateLayout(state).merkle_cache, ignore_errors=True)


def measure(state: Path, env: dict[str, str], manifest: dict, repeats: int, starts: int) -> dict:
    kinds = page_kinds(manifest)
    runs = []
    later: dict[str, list[float]] = {}
    for n in range(starts):
        forget_trees(state)  # each start is the first ever: nothing saved by an earlier portal
        run, times = first_renders(state, env, manifest, kinds, repeats if n == 0 else 0)
        runs.append(run)
        later = later or times
    rows = []
    for kind in kinds:
        firsts = [run["first"][kind.path] for run in runs]
        times = sorted(later[kind.path])
        p95 = times[min(len(times) - 1, max(0, round(0.95 * len(times)) - 1))]
        rows.append({"page": kind.name, "scope": kind.scope, "path": kind.path, "status": kind.status,
                     "first_ms": [round(ms, 1) for ms, _ in firsts],
                     "warm_up_done": [done for _, done in firsts],
                     "median_ms": round(statistics.median(times), 1), "p95_ms": round(p95, 1),
                     "target_ms": kind.target_ms})
    immediate = []
    for restarted in (False, True):  # the first start ever, then restarts that read the tree an earlier one saved
        for kind in kinds:
            if kind.scope == "large" and kind.name in ("contributor", "contribution"):
                firsts = []
                for _ in range(starts):
                    if not restarted:
                        forget_trees(state)
                    firsts.append(immediately(state, env, kind))
                immediate.append({"page": kind.name + (" (restart)" if restarted else " (first)"),
                                  "scope": kind.scope, "path": kind.path, "restarted": restarted,
                                  "first_ms": [round(ms, 1) for ms, _ in firsts],
                                  "warm_up_done": [done for _, done in firsts], "target_ms": kind.target_ms})
    return {"portal_ready_seconds": [round(run["start_seconds"], 2) for run in runs],
            "warm_up_seconds": [run["warm_up_seconds"] for run in runs], "pages": rows,
            "immediately_after_start": immediate}


def verdict(ms: float, target: float) -> str:
    return "PASS" if ms <= target else "MISS"


def warm_state(done: list[bool]) -> str:
    return "done" if all(done) else "running" if not any(done) else f"{sum(done)}/{len(done)} done"


def print_table(result: dict) -> None:
    starts = len(result["portal_ready_seconds"])
    print(f"large: '{LARGE}', {result['contributions']} contributions by {result['contributors']} contributors; "
          f"demo: the demo datanet (12 by 4)")
    print(f"{starts} portal starts: ready {result['portal_ready_seconds']} s after spawn, Merkle warm-up "
          f"{result['warm_up_seconds']} s after ready")
    print(f"first = the page's first request after a start (median and worst of {starts} starts); warm-up = whether "
          f"the warm-up had finished when it was sent; median/p95 of {result['repeats']} later renders (first start)")
    head = (f"{'page':<18} {'datanet':<7} {'first ms':>9} {'worst':>8} {'warm-up':>12} {'median':>8} {'p95':>8} "
            f"{'target':>7} {'first':>5} {'p95':>5}")
    print(head)
    print("-" * len(head))
    for row in result["pages"]:
        worst = max(row["first_ms"])
        print(f"{row['page']:<18} {row['scope']:<7} {statistics.median(row['first_ms']):>9.1f} {worst:>8.1f} "
              f"{warm_state(row['warm_up_done']):>12} {row['median_ms']:>8.1f} {row['p95_ms']:>8.1f} "
              f"{row['target_ms']:>7.0f} {verdict(worst, row['target_ms']):>5} "
              f"{verdict(row['p95_ms'], row['target_ms']):>5}")
    print("the one request to a portal the moment it is ready (first: no tree saved yet; restart: the tree an "
          "earlier start saved in <state>/cache/merkle/):")
    for row in result["immediately_after_start"]:
        worst = max(row["first_ms"])
        print(f"{row['page']:<18} {row['scope']:<7} {statistics.median(row['first_ms']):>9.1f} {worst:>8.1f} "
              f"{warm_state(row['warm_up_done']):>12} {'':>8} {'':>8} {row['target_ms']:>7.0f} "
              f"{verdict(worst, row['target_ms']):>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, help="where the state directory is built (reused when present; "
                        "default: a temporary directory)")
    parser.add_argument("--contributions", type=int, default=100_000, help="contributions of the large datanet")
    parser.add_argument("--contributors", type=int, default=500, help="contributors of the large datanet")
    parser.add_argument("--repeats", type=int, default=20, help="later renders of each page")
    parser.add_argument("--starts", type=int, default=3, help="fresh portals whose first renders are measured")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    from gateway.ledger_process import LedgerProcess
    from tests.support.ports import NO_CHAIN, free_port

    with tempfile.TemporaryDirectory(prefix="bench-portal-") as tmp:
        work = args.work_dir or Path(tmp)
        state = work / f"state-{args.contributions}-{args.contributors}"
        state.mkdir(parents=True, exist_ok=True)
        manifest_path = state / "bench-manifest.json"
        manifest = build_registry(state, args.contributions, args.contributors)
        port = free_port()
        env = {**NO_CHAIN, "GATEWAY_LEDGER_PORT": str(port), "PYTHONPATH": str(ROOT),
               "GATEWAY_BASE_MODEL": os.environ["GATEWAY_BASE_MODEL"]}
        ledger = LedgerProcess(state, "127.0.0.1", port, env=env, log_file=work / "ledger.log").start()
        try:
            if manifest_path.exists():
                manifest.update(json.loads(manifest_path.read_text()))
            else:
                saved = build_ledger(state, ledger, manifest)
                saved.update(demo_trace=manifest["demo"]["trace"], large_trace=manifest["large"]["trace"])
                manifest_path.write_text(json.dumps(saved))
                manifest.update(saved)
            manifest["demo"]["trace"], manifest["large"]["trace"] = manifest["demo_trace"], manifest["large_trace"]
            result = measure(state, env, manifest, args.repeats, args.starts)
        finally:
            ledger.stop()
    result.update(contributions=args.contributions, contributors=args.contributors, repeats=args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
