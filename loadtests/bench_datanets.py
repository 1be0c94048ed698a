"""Datanet throughput: contributions ingested per second and publish time, for several datanet sizes.

For each size N: N distinct synthetic passages (about 50 words, seeded) from 20 contributors are
signed (EIP-191) and submitted in batches of 500 through the registry (signature recovery,
size/daily limits, exact and near-duplicate checks, inserts); then the datanet is published:
attribution index (infini-gram over the demo tokenizer) + Merkle root + anchor transaction on a
local anvil. Prints one line per size (and JSON with --json).

    .venv/bin/python loadtests/bench_datanets.py --sizes 1000 10000 100000
    DATABASE_URL=postgresql://… .venv/bin/python loadtests/bench_datanets.py   # another backend
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from attribution.index_builder import build_index  # noqa: E402
from bench_index import synthetic_datanet  # noqa: E402
from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode  # noqa: E402
from ledger.chain.client import ChainClient  # noqa: E402
from ledger.chain.registry import ensure_registry  # noqa: E402
from registry.config import DatanetConfig  # noqa: E402
from registry.contribution_content import address_of_key, content_id, normalize, sign_contribution  # noqa: E402
from registry.datanets import DatanetRegistry, SignedText  # noqa: E402
from storage.database import database_url, open_database  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from training.demo_assets import ensure_base_model  # noqa: E402

BATCH = 500
CONTRIBUTORS = 20


def run_size(size: int, work: Path, tokenizer_dir: Path, registry_contract, keys: list[str]) -> dict:  # type: ignore[no-untyped-def]
    engine = open_database(database_url(work / f"db-{size}"))
    limits = DatanetConfig(max_bytes_per_contributor_per_day=10**12)
    registry = DatanetRegistry(engine, limits)
    datanet = registry.create(f"bench-{size}-{int(time.time())}")
    texts = [text for _, text in synthetic_datanet(size, seed=size)]
    addresses = [address_of_key(k) for k in keys]

    started = time.perf_counter()
    items = []
    for i, text in enumerate(texts):
        who = i % len(keys)
        items.append(SignedText(f"p{i}", text, addresses[who],
                                sign_contribution(keys[who], datanet.id, content_id(normalize(text)))))
    signed_seconds = time.perf_counter() - started

    started = time.perf_counter()
    accepted = 0
    for start in range(0, size, BATCH):
        accepted += len(registry.contribute(datanet.name, items[start : start + BATCH]).accepted)
    ingest_seconds = time.perf_counter() - started

    started = time.perf_counter()
    version = registry.publish(
        datanet.name, lambda docs, out: build_index(docs, tokenizer_dir, out), registry_contract,
        work / "indexes",
    )
    publish_seconds = time.perf_counter() - started
    engine.dispose()
    return {
        "contributions": size, "accepted": accepted,
        "sign_per_second": round(size / signed_seconds), "ingest_per_second": round(size / ingest_seconds),
        "ingest_seconds": round(ingest_seconds, 2), "publish_seconds": round(publish_seconds, 2),
        "tx_hash": version.tx_hash,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind so the anvil node is stopped

    with tempfile.TemporaryDirectory(prefix="bench-datanets-") as tmp:
        work = Path(tmp)
        model_dir = ensure_base_model(work / "model")
        keys = [f"0x{(i + 1):064x}" for i in range(CONTRIBUTORS)]
        with AnvilNode(work, port=free_port()) as node:
            contract = ensure_registry(ChainClient(node.rpc_url, ANVIL_DEV_KEYS[0]), work / "deployment.json")
            results = []
            for size in args.sizes:
                result = run_size(size, work, model_dir, contract, keys)
                results.append(result)
                if not args.json:
                    print(f"{size:>7} contributions: ingest {result['ingest_per_second']:>6}/s "
                          f"({result['ingest_seconds']} s; signing {result['sign_per_second']}/s client-side), "
                          f"publish {result['publish_seconds']} s (index + root + anchor)", flush=True)
    if args.json:
        print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
