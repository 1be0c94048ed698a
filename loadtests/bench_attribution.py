"""Attribution cost per completion token vs the engine's generation speed, on the same machine.

For each index size in `--tokens` (about 1M, 10M, 100M content tokens): a synthetic datanet of
~60-token passages (seeded words of CPython's library reference, as in bench_index.py) is indexed
once with `attribution.index_builder.build_index` into `--work-dir` (an index already built there is
reused, so reruns skip the build; a build whose estimated time exceeds `--max-build-minutes` is
skipped and only its estimate reported). Then `Attributor([index_dir])` attributes `--requests`
completions of each length in `--lengths` (64 and 256 tokens) after a `--context-tokens` prompt.
Each completion alternates 16-token segments copied from random indexed passages with 16-token
segments of random words (half copied, half not; which comes first is random).

Per (size, length): ms per completion token of one in-process `attribute` call (p50, p95 over the
requests) and the share of it spent in the span search (the rest is the weighting); tokens/s through
the worker processes the gateway uses (attribution/search_pool.py) with one worker and one caller,
and with two workers and two callers, and their ratio; tokens per CPU-second of the one worker process
(its per-core speed, whatever else the machine runs). The two pools run side by side: both started
and warm first, then `--rounds` rounds of one phase each, alternating which goes first, every phase
attributing the same completions as many times over as makes it last about `--phase-seconds` (both
pools the same number of passes per caller); figures are totals over the rounds, and each round's own
ratio is reported too (their spread is the noise). Then the engine's own `attribute` (the path before
span_search.py) on `--engine-requests` of the completions. Finally the vLLM offline engine on the
demo model generates 64 prompts x 64 tokens greedily (ignore_eos) and its output tokens/s is
compared with one worker's. The 1-minute load average is recorded before each phase (other
processes skew everything: check it).

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
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.attributor import Attributor  # noqa: E402
from attribution.search_pool import ProcessAttributors  # noqa: E402
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
    """One thread in this process: `Attributor.attribute`, timed as search (spans) + weighting."""
    per_token_ms = []
    attributed = 0.0
    tokens = 0
    search_seconds = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for context, completion in requests:
        started = time.perf_counter()
        spans = attributor.spans(context + completion)
        searched = time.perf_counter()
        result = attributor.policy.token_weights(spans, completion, completion_start=len(context))
        per_token_ms.append((time.perf_counter() - started) * 1000 / len(completion))
        search_seconds += searched - started
        attributed += sum(t.attributed for t in result)
        tokens += len(completion)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "ms_per_token_p50": round(percentile(per_token_ms, 50), 4),
        "ms_per_token_p95": round(percentile(per_token_ms, 95), 4),
        "tokens_per_s_1thread": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / cpu, 1) if cpu > 0 else None,
        "cpu_per_wall_1thread": round(cpu / wall, 2),
        "search_share": round(search_seconds / wall, 2),
        "attributed_share": round(attributed / tokens, 3),
        "requests": len(requests),
    }


def time_engine(attributor: Attributor, requests: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """The previous path: the infini-gram engine's `attribute` (a thread per query position), one caller."""
    tokens = 0
    wall0 = time.perf_counter()
    for context, completion in requests:
        spans = attributor.engine_spans(context + completion)
        attributor.policy.token_weights(spans, completion, completion_start=len(context))
        tokens += len(completion)
    return {"engine_tokens_per_s": round(tokens / (time.perf_counter() - wall0), 1)}


def worker_cpu_seconds(pool: ProcessAttributors) -> float:
    total = 0.0
    for pid in pool.pids():
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def warm_workers(pool: ProcessAttributors, index_dir: Path, requests: list[tuple[list[int], list[int]]]) -> None:
    """Every worker of `pool` started, with the index open (`pool.workers` callers at once until it is so)."""
    lineage = (str(index_dir),)
    with concurrent.futures.ThreadPoolExecutor(max_workers=pool.workers) as threads:
        while len(pool.pids()) < pool.workers:
            list(threads.map(lambda k: [pool.attribute(lineage, *requests[i]) for i in range(k, k + 5)],
                             range(pool.workers)))


def run_phase(pool: ProcessAttributors, index_dir: Path, requests: list[tuple[list[int], list[int]]],
              passes: int, seed: int) -> dict[str, float]:
    """`pool.workers` callers, each attributing every request `passes` times (own order), at once."""
    lineage = (str(index_dir),)

    def caller(order: list[int]) -> int:
        done = 0
        for i in order:
            context, completion = requests[i]
            pool.attribute(lineage, context, completion)
            done += len(completion)
        return done

    orders = []
    for k in range(pool.workers):
        order = list(range(len(requests))) * passes
        random.Random(seed * 100 + k).shuffle(order)
        orders.append(order)
    with concurrent.futures.ThreadPoolExecutor(max_workers=pool.workers) as threads:
        cpu0, callers0, wall0 = worker_cpu_seconds(pool), time.process_time(), time.perf_counter()
        tokens = sum(threads.map(caller, orders))
        wall = time.perf_counter() - wall0
        cpu, callers = worker_cpu_seconds(pool) - cpu0, time.process_time() - callers0
    return {"tokens": tokens, "wall": wall, "worker_cpu": cpu, "caller_cpu": callers}


def time_workers(index_dir: Path, requests: list[tuple[list[int], list[int]]], rounds: int,
                 passes: int) -> dict[int, dict[str, Any]]:
    """One worker (one caller) and two workers (two callers) side by side: both pools started and warm
    first, then `rounds` rounds of one phase each, alternating which goes first (1-2, 2-1, ...), every
    phase over the same completions (`passes` times per caller). Figures are totals over the rounds;
    `ratios` are the rounds' own two-to-one ratios (their spread is the noise)."""
    pools = {count: ProcessAttributors(count) for count in (1, 2)}
    phases: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    try:
        for pool in pools.values():
            warm_workers(pool, index_dir, requests)
        for number in range(rounds):
            for count in ((1, 2) if number % 2 == 0 else (2, 1)):
                phases[count].append(run_phase(pools[count], index_dir, requests, passes, seed=number))
    finally:
        for pool in pools.values():
            pool.close()
    out: dict[int, dict[str, Any]] = {}
    for count, runs in phases.items():
        tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall"] for r in runs)
        cpu, callers = sum(r["worker_cpu"] for r in runs), sum(r["caller_cpu"] for r in runs)
        out[count] = {"tokens_per_s": round(tokens / wall, 1),
                      "tokens_per_worker_cpu_s": round(tokens / cpu, 1) if cpu else None,
                      "caller_cpu_per_worker_cpu": round(callers / cpu, 3) if cpu else None,
                      "phase_seconds": [round(r["wall"], 2) for r in runs]}
    out[2]["ratios"] = [round((b["tokens"] / b["wall"]) / (a["tokens"] / a["wall"]), 2)
                        for a, b in zip(phases[1], phases[2], strict=True)]
    return out


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
            log(f"  {length}-token completions, in process: {single['ms_per_token_p50']} ms/token p50, "
                f"{single['ms_per_token_p95']} p95, {single['tokens_per_s_1thread']} tokens/s "
                f"({single['search_share']:.0%} in the search; {single['attributed_share']:.0%} attributed; "
                f"load {load['load1']})")
            passes = max(1, math.ceil(args.phase_seconds * single["tokens_per_s_1thread"] / (len(requests) * length)))
            workers = time_workers(index_dir, requests, args.rounds, passes)
            for count in (1, 2):
                log(f"  {length}-token completions, {count} worker process(es): {workers[count]['tokens_per_s']} "
                    f"tokens/s ({workers[count]['tokens_per_worker_cpu_s']} per worker CPU-second; callers' CPU "
                    f"{workers[count]['caller_cpu_per_worker_cpu']} of the workers'; phases "
                    f"{workers[count]['phase_seconds']} s)")
            log(f"  {length}-token completions, two ÷ one by round: {workers[2]['ratios']} ({args.rounds} rounds of "
                f"{passes} passes over the {len(requests)} completions per caller)")
            engine = time_engine(attributor, requests[: args.engine_requests]) if args.engine_requests else {}
            if engine:
                log(f"  {length}-token completions, the engine's own attribute (before): "
                    f"{engine['engine_tokens_per_s']} tokens/s")
            rows.append({"index_tokens": manifest.token_count, "index_docs": manifest.doc_count,
                         "completion_tokens": length, "context_tokens": args.context_tokens,
                         "load1_before": load["load1"], **single, **engine,
                         "tokens_per_s_1worker": workers[1]["tokens_per_s"],
                         "tokens_per_worker_cpu_s_1worker": workers[1]["tokens_per_worker_cpu_s"],
                         "tokens_per_s_2workers": workers[2]["tokens_per_s"],
                         "tokens_per_worker_cpu_s_2workers": workers[2]["tokens_per_worker_cpu_s"],
                         "caller_cpu_per_worker_cpu_1worker": workers[1]["caller_cpu_per_worker_cpu"],
                         "caller_cpu_per_worker_cpu_2workers": workers[2]["caller_cpu_per_worker_cpu"],
                         "passes": passes, "rounds": args.rounds, "ratio_2_to_1_by_round": workers[2]["ratios"],
                         "ratio_2_to_1": round(workers[2]["tokens_per_s"] / workers[1]["tokens_per_s"], 2)})
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
def print_table(report: dict[str, Any]) -> None:
    gen = report.get("generation")
    print()
    print(f"{'index tok':>11} {'compl':>5} {'ms/tok p50':>10} {'p95':>6} {'search':>6} {'before':>7} "
          f"{'1 worker':>8} {'per CPU-s':>9} {'2 workers':>9} {'2/1':>5} {'attr%':>5} {'1w/gen':>6}")
    for row in report["attribution"]:
        ratio = row.get("ratio_attr_per_core_to_gen")
        print(f"{row['index_tokens']:>11,} {row['completion_tokens']:>5} {row['ms_per_token_p50']:>10.4f} "
              f"{row['ms_per_token_p95']:>6.3f} {row['search_share'] * 100:>5.0f}% "
              f"{row.get('engine_tokens_per_s', 0):>7,.0f} {row['tokens_per_s_1worker']:>8,.0f} "
              f"{row['tokens_per_worker_cpu_s_1worker'] or 0:>9,.0f} {row['tokens_per_s_2workers']:>9,.0f} "
              f"{row['ratio_2_to_1']:>5.2f} {row['attributed_share'] * 100:>5.0f} "
              f"{ratio if ratio is not None else '-':>6}")
    for skipped in report["skipped"]:
        print(f"{skipped['target_tokens']:>11.0f}  skipped: estimated build {skipped['estimated_build_minutes']} min "
              f"> {skipped['limit_minutes']} min")
    for built in report["builds"]:
        print(f"index {built['label']}: {built['tokens']} tokens, {built['docs']} docs, build {built['build_seconds']} s"
              f"{' (reused)' if not built['built_now'] else ''}, {built['mib']} MiB")
    if gen:
        print(f"generation (vLLM, demo model, {gen['prompts']} prompts x {GEN_TOKENS} tokens, greedy): "
              f"{gen['tokens_per_s']} output tokens/s ({gen['seconds']} s; load before {gen['load1_before']})")
    print("ms/tok: one in-process call per completion; search = share of that time in the span search (the rest "
          "is the weighting); before = the engine's own attribute, one caller; 1 worker / 2 workers = tokens/s "
          "through attribution/search_pool.py with as many callers; per CPU-s = tokens per CPU-second of the "
          "one worker process; 1w/gen = one worker's tokens/s / generation tokens/s")
    print(f"load: start {report['load_start']['uptime']}")
    print(f"      end   {report['load_end']['uptime']}")


def print_markdown(report: dict[str, Any]) -> None:
    """The table of docs/benchmarks.md "## Attribution"."""
    gen = report.get("generation")
    print()
    print("| index tokens | completion | ms/token p50 / p95 (in process) | in the search | before: the engine's "
          "attribute, tokens/s | one worker, tokens/s | one worker, tokens per CPU-second | two workers, tokens/s "
          "| two ÷ one (rounds' range) |" + (" one worker ÷ generation |" if gen else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gen else ""))
    for row in report["attribution"]:
        cells = [f"{row['index_tokens'] / 1e6:.1f}M", str(row["completion_tokens"]),
                 f"{row['ms_per_token_p50']:.3f} / {row['ms_per_token_p95']:.3f}", f"{row['search_share']:.0%}",
                 f"{row.get('engine_tokens_per_s', 0):,.0f}", f"{row['tokens_per_s_1worker']:,.0f}",
                 f"{row['tokens_per_worker_cpu_s_1worker'] or 0:,.0f}", f"{row['tokens_per_s_2workers']:,.0f}",
                 f"**{row['ratio_2_to_1']:.2f}** ({min(row['ratio_2_to_1_by_round']):.2f}–"
                 f"{max(row['ratio_2_to_1_by_round']):.2f})"]
        if gen:
            cells.append(f"{row.get('ratio_attr_per_core_to_gen', '-')}")
        print("| " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="index sizes (content tokens)")
    parser.add_argument("--work-dir", type=Path, help="where indexes and the demo model live (reused; default a temp dir)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256], help="completion lengths (tokens)")
    parser.add_argument("--requests", type=int, default=200, help="measured completions per (size, length)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured completions first")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of one 1-worker and one 2-worker phase each (alternating which goes first)")
    parser.add_argument("--phase-seconds", type=float, default=3.0,
                        help="about this long per phase: the completions are attributed as many times over as needed")
    parser.add_argument("--context-tokens", type=int, default=32, help="prompt tokens before each completion")
    parser.add_argument("--engine-requests", type=int, default=50,
                        help="completions per (size, length) also timed on the engine's own attribute (0: skip)")
    parser.add_argument("--max-build-minutes", type=float, default=10.0, help="skip builds estimated to take longer")
    parser.add_argument("--no-generation", action="store_true", help="skip the vLLM generation measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress lines go to stderr)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
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
            row["ratio_attr_per_core_to_gen"] = round(row["tokens_per_s_1worker"] / gen_tps, 2)
            row["cores_to_keep_up"] = round(gen_tps / row["tokens_per_s_1worker"], 3)
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
        print_table(report)
        if args.markdown:
            print_markdown(report)


if __name__ == "__main__":
    main()
