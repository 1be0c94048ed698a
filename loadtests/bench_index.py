"""Attribution index build throughput for synthetic datanets of several sizes.

For each size N: N passages of 40-60 words drawn (seeded, uniformly) from the words of CPython's
bundled library reference (`pydoc_data.topics`), contribution id = sha256 of the text; the index is
built with `attribution.index_builder.build_index` over the demo tokenizer (built into a temporary
directory unless `--tokenizer-dir` is given). Prints documents, tokens, build seconds, documents/s and
tokens/s, index bytes on disk, and the latency of one `attribute()` call over a 500-token response
stitched from 25-token slices of indexed passages (the next step's query shape).

    .venv/bin/python loadtests/bench_index.py --sizes 1000 10000 100000 [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.index_builder import build_index, load_base_tokenizer  # noqa: E402
from attribution.index_reader import open_index  # noqa: E402
from training.demo_assets import build_tokenizer  # noqa: E402

RESPONSE_TOKENS = 500
SLICE_TOKENS = 25


def topic_words() -> list[str]:
    """Distinct lower-case words of 2-14 letters from the library reference topics, sorted."""
    from pydoc_data.topics import topics

    return sorted({word.lower() for text in topics.values() for word in re.findall(r"[A-Za-z]{2,14}", text)})


def synthetic_datanet(size: int, seed: int) -> list[tuple[str, str]]:
    """`size` (contribution id, text) pairs, deterministic for (size, seed)."""
    rng = random.Random(seed)
    words = topic_words()
    documents = []
    for _ in range(size):
        text = " ".join(rng.choices(words, k=rng.randint(40, 60))).capitalize() + "."
        documents.append((hashlib.sha256(text.encode()).hexdigest(), text))
    return documents


def attribute_latency(index_dir: Path, tokenizer_dir: Path, documents: list[tuple[str, str]], seed: int) -> dict:
    """Time one attribute() over a response made of slices of indexed passages; check it finds them."""
    rng = random.Random(seed)
    tokenizer = load_base_tokenizer(tokenizer_dir).tokenizer
    response: list[int] = []
    sources = []
    while len(response) < RESPONSE_TOKENS:
        cid, text = documents[rng.randrange(len(documents))]
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        start = rng.randrange(max(1, len(ids) - SLICE_TOKENS))
        response.extend(ids[start : start + SLICE_TOKENS])
        sources.append(cid)
    response = response[:RESPONSE_TOKENS]
    with open_index(index_dir) as index:
        index.attribute(response, min_len=4)  # warm the page cache once
        started = time.perf_counter()
        spans = index.attribute(response, min_len=4)
        seconds = time.perf_counter() - started
    found = {cid for span in spans for cid in span.contribution_ids}
    return {
        "attribute_ms": round(seconds * 1000, 1),
        "spans": len(spans),
        "sources_found": sum(cid in found for cid in set(sources)),
        "sources": len(set(sources)),
    }


def run_size(size: int, work: Path, tokenizer_dir: Path, seed: int) -> dict:
    started = time.perf_counter()
    documents = synthetic_datanet(size, seed=seed + size)
    generate_seconds = time.perf_counter() - started
    out_dir = work / f"datanet-{size}" / "v1"
    started = time.perf_counter()
    manifest = build_index(documents, tokenizer_dir, out_dir)
    seconds = time.perf_counter() - started
    index_bytes = sum(path.stat().st_size for path in out_dir.iterdir())
    return {
        "docs": manifest.doc_count,
        "tokens": manifest.token_count,
        "seconds": round(seconds, 2),
        "docs_per_second": round(manifest.doc_count / seconds),
        "tokens_per_second": round(manifest.token_count / seconds),
        "index_mib": round(index_bytes / 2**20, 1),
        "generate_seconds": round(generate_seconds, 2),
        **attribute_latency(out_dir, tokenizer_dir, documents, seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tokenizer-dir", type=Path, help="a fast tokenizer directory (default: build the demo one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        work = Path(tmp)
        tokenizer_dir = args.tokenizer_dir
        if tokenizer_dir is None:
            tokenizer_dir = work / "tokenizer"
            build_tokenizer(tokenizer_dir)
        results = []
        if not args.json:
            print(f"{'docs':>8} {'tokens':>10} {'seconds':>8} {'docs/s':>8} {'tokens/s':>10} {'MiB':>6}  attribute(500 tok)")
        for size in args.sizes:
            result = run_size(size, work, tokenizer_dir, args.seed)
            results.append(result)
            if not args.json:
                print(f"{result['docs']:>8} {result['tokens']:>10} {result['seconds']:>8} "
                      f"{result['docs_per_second']:>8} {result['tokens_per_second']:>10} {result['index_mib']:>6}  "
                      f"{result['attribute_ms']} ms, {result['spans']} spans, "
                      f"{result['sources_found']}/{result['sources']} sources found", flush=True)
    if args.json:
        print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
