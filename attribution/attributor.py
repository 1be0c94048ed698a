"""Per-token attribution of a completion against the indexes of an adapter's lineage.

The lineage's index directories are searched as shards of one index, in the order given
(attribution/span_search.py: infini-gram's maximal-span search in vectorised numpy, with the same
results as the engine's `attribute`); every occurrence maps back to (index, local document) and so to
a contribution id. The infini-gram engine itself is opened only when asked for (`engine`,
`engine_spans`: the reference the search is tested against; `longest_matches`).

Query: the last `MAX_CONTEXT_TOKENS` (512) context tokens followed by the whole completion, in one
`attribute` call. Context before that tail cannot extend a span into the completion unless the span
is longer than 512 tokens, which only shortens (never drops) such a span's evidence.

Thread safety: `attribute` only reads memory-mapped files and may be called from several threads at
once (they share the GIL: for parallel work use attribution/search_pool.py); `close` must not race
with `attribute` (call it when no query is in flight).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attribution.index_builder import (
    IndexManifest,
    tokenizer_sha256,
    validate_index_path,
)
from attribution.policy import MatchedSpan, SpanWeightingPolicy, calibrated_min_span
from attribution.span_search import SpanSearch
from ledger.client.trace import TokenAttribution

MAX_CONTEXT_TOKENS = 512


class Attributor:
    """Attribute completions to contributions of the given indexes (an `AttributionMethod`)."""

    def __init__(self, index_dirs: Sequence[Path], policy: SpanWeightingPolicy | None = None, *,
                 tokenizer_dir: Path | None = None, load_to_ram: bool = False) -> None:
        """Open `index_dirs` as one index (all built with the same tokenizer; [] = no lineage).

        `policy` defaults to the span rule with the L0 calibrated for the indexes' tokenizer.
        `tokenizer_dir`, if given, must hold the indexes' tokenizer; `load_to_ram` reads the index
        files into memory instead of memory-mapping them.
        """
        self.policy = policy or SpanWeightingPolicy()
        self.name = self.policy.name
        self.index_dirs = [validate_index_path(Path(directory)) for directory in index_dirs]
        self._manifests = [IndexManifest.load(directory) for directory in self.index_dirs]
        self._contributions: list[list[str]] = []
        self._offsets: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._engine: Any = None
        self._search: SpanSearch | None = None
        self._load_to_ram = load_to_ram
        if not self.index_dirs:
            return  # base model, no lineage: everything is unattributed
        first = self._manifests[0]
        if policy is None:
            self.policy = SpanWeightingPolicy(min_span_tokens=calibrated_min_span(first.tokenizer_sha256))
        for directory, manifest in zip(self.index_dirs, self._manifests, strict=True):
            for key in ("tokenizer_sha256", "token_dtype", "vocab_size", "layout_version", "eos_token_id"):
                if getattr(manifest, key) != getattr(first, key):
                    raise ValueError(f"index {directory} differs from {self.index_dirs[0]} in {key}")
        if tokenizer_dir is not None:
            if tokenizer_sha256(tokenizer_dir) != first.tokenizer_sha256:
                raise ValueError(f"the indexes were not built with the tokenizer in {tokenizer_dir}")
        self._id_limit = first.vocab_size
        self._search = SpanSearch(self.index_dirs, self._manifests, load_to_ram=load_to_ram)
        for directory, manifest, shard in zip(self.index_dirs, self._manifests, self._search.shards, strict=True):
            if len(shard.contributions) != manifest.doc_count:
                raise ValueError(f"{directory}: {len(shard.contributions)} contribution ids for "
                                 f"{manifest.doc_count} documents")
            self._contributions.append(shard.contributions)
            self._offsets.append(shard.offsets)

    @property
    def engine(self) -> Any:
        """The infini-gram engine over the same indexes, opened on first use (None without indexes)."""
        with self._lock:
            if self._engine is None and self._search is not None:
                self._engine = self._open_engine()
            return self._engine

    def _open_engine(self) -> Any:
        from infini_gram.engine import InfiniGramEngine

        first = self._manifests[0]
        engine = InfiniGramEngine(
            index_dir=[str(directory) for directory in self.index_dirs],
            eos_token_id=first.eos_token_id, vocab_size=first.vocab_size, version=first.layout_version,
            token_dtype=first.token_dtype, precompute_unigram_logprobs=True, load_to_ram=self._load_to_ram,
        )
        if engine.get_total_doc_cnt() != sum(m.doc_count for m in self._manifests):
            raise ValueError("the engine's document count does not match the indexes' manifests")
        return engine

    def contribution_of(self, shard: int, pointer: int) -> str:
        """The contribution id of the document holding byte offset `pointer` in index number `shard`."""
        doc = int(np.searchsorted(self._offsets[shard], np.uint64(pointer), side="right")) - 1
        return self._contributions[shard][doc]

    def spans(self, query_ids: Sequence[int]) -> list[MatchedSpan]:
        """Maximal spans of `query_ids` accepted by the engine's filters (length >= L0, count <= max_count)."""
        search = self._search
        if search is None or not query_ids:
            return []
        return search.spans(self._checked_query(query_ids), self.policy.min_span_tokens, self.policy.max_count)

    def engine_spans(self, query_ids: Sequence[int]) -> list[MatchedSpan]:
        """`spans` computed by the infini-gram engine (the reference; slower: a thread per position)."""
        engine = self.engine
        if engine is None or not query_ids:
            return []
        query = self._checked_query(query_ids)
        result = engine.attribute(query, delim_ids=[], min_len=self.policy.min_span_tokens,
                                  max_cnt=self.policy.max_count, enforce_bow=False)
        if "error" in result:
            raise ValueError(f"infini-gram: {result['error']}")
        spans = []
        for span in result["spans"]:
            contributions = sorted({self.contribution_of(doc["s"], doc["ptr"]) for doc in span["docs"]})
            spans.append(MatchedSpan(start=span["l"], end=span["r"], count=span["count"],
                                     contribution_ids=tuple(contributions),
                                     surprisal_nats=-float(span["unigram_logprob_sum"])))
        return spans

    def attribute(self, context_ids: Sequence[int], completion_ids: Sequence[int]) -> list[TokenAttribution]:
        """One TokenAttribution per completion token (all unattributed without indexes)."""
        context = list(context_ids)[-MAX_CONTEXT_TOKENS:]
        completion = list(completion_ids)
        if self._search is None or not completion:
            return [TokenAttribution.unattributed_token(int(token)) for token in completion]
        spans = self.spans(context + completion)
        return self.policy.token_weights(spans, completion, completion_start=len(context))

    def token_weights(self, context_ids: Sequence[int], completion_ids: Sequence[int]) -> list[TokenAttribution]:
        """`AttributionMethod` protocol: same as `attribute`."""
        return self.attribute(context_ids, completion_ids)

    def longest_matches(self, token_ids: Sequence[int]) -> list[int]:
        """For each position l, the length of the longest token_ids[l:r] occurring in the indexes."""
        engine = self.engine
        if engine is None or not token_ids:
            return [0] * len(token_ids)
        result = engine.creativity(self._checked_query(token_ids))
        if "error" in result:
            raise ValueError(f"infini-gram: {result['error']}")
        return [int(end) - start for start, end in enumerate(result["rs"])]

    def close(self) -> None:
        with self._lock:
            self._engine = None
            self._search = None

    def __enter__(self) -> Attributor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _checked_query(self, token_ids: Sequence[int]) -> list[int]:
        query = [int(token) for token in token_ids]
        for token in query:
            if not 0 <= token < self._id_limit:
                raise ValueError(f"token id {token} is outside [0, {self._id_limit})")
        return query
