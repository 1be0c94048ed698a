"""infini-gram's maximal-span search, in vectorised numpy over the memory-mapped suffix arrays.

`SpanSearch.spans` returns exactly what `InfiniGramEngine.attribute(query, delim_ids=[], min_len,
max_cnt, enforce_bow=False)` returns, mapped to contributions (tests/attribution/test_span_search.py
compares the two on built indexes). The engine starts one OS thread per query position, per shard and
per span, which costs far more than the search itself; here all positions of a query advance together:

1. the suffix-array range of every one-token prefix is computed once, when the index is opened;
2. every position's range is narrowed one token at a time by a batched binary search over the
   suffix array (the suffixes of a range share its prefix, so they are sorted by their next token);
   a range of at most `DIRECT_WIDTH` suffixes is finished by comparing those suffixes with the query
   directly;
3. a position's longest match is the longest prefix whose range is not empty, and that range is
   the match's occurrences.

Keys: the suffix array is sorted by the bytes of the little-endian token stream, so tokens are
compared as big-endian integers of the same width (byte order = numeric order).

One quirk of the engine is kept on purpose (same attributions as before): when a suffix of the query
sorts before every suffix of a shard and is not found whole, the engine reports no match in that shard.

Thread safety: read-only after construction; `spans` may run in several threads at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution.index_builder import (
    CONTRIBUTIONS_FILE,
    OFFSETS_FILE,
    SUFFIX_ARRAY_FILE,
    TOKEN_DTYPES,
    TOKENS_FILE,
    UNIGRAM_FILE,
    IndexManifest,
)
from attribution.policy import MatchedSpan

DIRECT_WIDTH = 8  # ranges this narrow are finished by comparing their suffixes with the query
DIRECT_CHUNK = 32  # tokens compared per step when finishing directly
MISSING_LOGPROB = -10000.0  # the engine's unigram log-probability of a token absent from the index
NO_RANK = 2**63 - 1
SAMPLE_STEP = 32  # every 32nd suffix's first tokens are kept in memory, to start binary searches close
SAMPLE_TOKENS = 3  # tokens per sample key: 17 bits each (token key + 1; 0 where the suffix ended)
SAMPLE_BITS = 17


@dataclass
class _Match:
    """Per query position: matched length and suffix-array range [lo, hi) of that prefix, one shard."""

    length: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _packed_prefixes(keys: np.ndarray) -> list[np.ndarray]:
    """At index k (1 .. SAMPLE_TOKENS - 1): each query position's next k + 1 tokens packed as a sample key
    (digits past the query's end are 0; a prefix is only used where it lies inside the query)."""
    n = len(keys)
    packed = np.zeros(n, dtype=np.uint64)
    prefixes = [packed]
    for j in range(SAMPLE_TOKENS):
        digits = np.zeros(n, dtype=np.uint64)
        digits[: n - j] = keys[j:].astype(np.uint64) + np.uint64(1)
        packed = packed | (digits << np.uint64(SAMPLE_BITS * (SAMPLE_TOKENS - 1 - j)))
        if j:
            prefixes.append(packed)
    return prefixes


def _open(path: Path, dtype: str, load_to_ram: bool) -> np.ndarray:
    """The file as an array: read, or memory-mapped (a plain ndarray view: no np.memmap overhead per call)."""
    return np.fromfile(path, dtype=dtype) if load_to_ram else np.asarray(np.memmap(path, dtype=dtype, mode="r"))


class _Shard:
    """One index's token stream, suffix array and document offsets, memory-mapped."""

    def __init__(self, directory: Path, manifest: IndexManifest, load_to_ram: bool) -> None:
        width = TOKEN_DTYPES[manifest.token_dtype].itemsize
        self.width = width
        self.keys = _open(directory / TOKENS_FILE, f">u{width}", load_to_ram)  # big-endian: byte order
        table = _open(directory / SUFFIX_ARRAY_FILE, "u1", load_to_ram)
        self.size = len(self.keys)
        if not self.size or len(table) % self.size:
            raise ValueError(f"{directory}: suffix array does not match the token stream")
        self.ptr_size = len(table) // self.size
        self.table = table.reshape(self.size, self.ptr_size)
        # pointers read as unaligned 8-byte words (the low ptr_size bytes are the pointer); the last few
        # ranks, whose 8-byte word would run past the file, are kept apart
        self._shift = width.bit_length() - 1
        self._mask = np.uint64((1 << (8 * self.ptr_size)) - 1) if self.ptr_size < 8 else np.uint64(2**64 - 1)
        self._safe = max(0, (len(table) - 8) // self.ptr_size + 1)
        self._words = np.ndarray(shape=(self._safe,), dtype="<u8", buffer=table, strides=(self.ptr_size,))
        self._tail = self._slow_token_index(np.arange(self._safe, self.size, dtype=np.int64))
        self.offsets = _open(directory / OFFSETS_FILE, "<u8", load_to_ram)
        self.contributions: list[str] = json.loads((directory / CONTRIBUTIONS_FILE).read_text())
        if len(self.contributions) != len(self.offsets):
            raise ValueError(f"{directory}: {len(self.contributions)} contribution ids for {len(self.offsets)} documents")
        self.first_lo, self.first_hi = self._first_token_ranges(manifest.vocab_size)
        self.sample = self._sample() if width == 2 else None
        self.unigram_counts = self._unigram_counts(directory / UNIGRAM_FILE, manifest)

    # -- suffix array access -------------------------------------------------------------------
    def token_index(self, ranks: np.ndarray) -> np.ndarray:
        """Token position (in the stream) where the suffix of each rank starts."""
        if not self._safe:
            return self._tail[ranks]
        index = ((self._words[np.minimum(ranks, self._safe - 1)] & self._mask) >> np.uint64(self._shift)).view(np.int64)
        if len(self._tail) and len(ranks) and ranks.max() >= self._safe:
            index = np.where(ranks >= self._safe, self._tail[np.maximum(ranks - self._safe, 0)], index)
        return index

    def _slow_token_index(self, ranks: np.ndarray) -> np.ndarray:
        rows = self.table[ranks]
        padded = np.zeros((len(rows), 8), dtype=np.uint8)
        padded[:, : self.ptr_size] = rows
        return (padded.view("<u8").ravel() >> np.uint64(self._shift)).astype(np.int64)

    def key_at(self, index: np.ndarray) -> np.ndarray:
        """Key of the token at each stream position; -1 past the end (a suffix that ended sorts first)."""
        inside = index < self.size
        keys = self.keys[np.where(inside, index, 0)].astype(np.int64)
        return np.where(inside, keys, -1)

    def less_at(self, ranks: np.ndarray, offset: np.ndarray | int, target: np.ndarray) -> np.ndarray:
        """Whether each rank's suffix has, at `offset`, a token sorting before `target` (an ended suffix does)."""
        index = self.token_index(ranks) + offset
        return (self.keys[np.minimum(index, self.size - 1)] < target) | (index >= self.size)

    def lower_bound(self, lo: np.ndarray, hi: np.ndarray, offset: np.ndarray | int, target: np.ndarray) -> np.ndarray:
        """First rank in [lo, hi) whose token at `offset` has key >= target (all ranges share their prefix)."""
        lo, hi = lo.copy(), hi.copy()
        last = self.size - 1
        while True:
            open_ = lo < hi
            if not open_.any():
                return lo
            mid = (lo + hi) >> 1
            less = self.less_at(np.minimum(mid, last), offset, target)
            up = open_ & less
            lo = np.where(up, mid + 1, lo)
            hi = np.where(open_ ^ up, mid, hi)

    def bracket(self, lo: np.ndarray, hi: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) narrowed to where the lower bound of `target` (a packed prefix) lies, by the sample.

        Samples below the target are ranks below the bound, the first one not below is at or above it."""
        found = np.searchsorted(self.sample, target, side="left").astype(np.int64)  # type: ignore[arg-type]
        low = np.where(found > 0, (found - 1) * SAMPLE_STEP + 1, 0)
        high = np.minimum(found * SAMPLE_STEP, self.size)
        return np.maximum(lo, low), np.minimum(hi, high)

    def _sample(self) -> np.ndarray:
        """The first SAMPLE_TOKENS tokens of every SAMPLE_STEP-th suffix, packed (sorted, as the suffixes)."""
        ranks = np.arange(0, self.size, SAMPLE_STEP, dtype=np.int64)
        sample = np.zeros(len(ranks), dtype=np.uint64)
        for first in range(0, len(ranks), 1 << 20):
            start = self.token_index(ranks[first : first + (1 << 20)])
            packed = np.zeros(len(start), dtype=np.uint64)
            for j in range(SAMPLE_TOKENS):
                index = start + j
                digit = self.keys[np.minimum(index, self.size - 1)].astype(np.uint64) + np.uint64(1)
                packed = (packed << np.uint64(SAMPLE_BITS)) | np.where(index < self.size, digit, np.uint64(0))
            sample[first : first + len(packed)] = packed
        return sample

    def _first_token_ranges(self, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.arange(vocab_size, dtype=np.int64)
        keys = tokens.astype(f"<u{self.width}").astype(f">u{self.width}").view(f"<u{self.width}").astype(np.int64)
        # keys above are the tokens' bytes read big-endian, i.e. byte-swapped values
        zeros = np.zeros(vocab_size, dtype=np.int64)
        full = np.full(vocab_size, self.size, dtype=np.int64)
        lo = self.lower_bound(zeros, full, 0, keys)
        hi = self.lower_bound(lo, full, 0, keys + 1)
        return lo, hi

    def _unigram_counts(self, path: Path, manifest: IndexManifest) -> dict[int, int]:
        """Token → occurrences, as the engine reads them (unigram.0 if present, else the ranges)."""
        if not path.is_file():
            counts = {token: int(count) for token, count in enumerate((self.first_hi - self.first_lo).tolist()) if count}
            separators = self.size - sum(counts.values())
            if separators:
                counts[manifest.doc_separator] = separators
            return counts
        counts: dict[int, int] = {}
        for number, line in enumerate(path.read_text().splitlines()):
            fields = line.split()
            token, count = (int(fields[0]), int(fields[1])) if len(fields) == 2 else (number, int(fields[0]))
            counts[token] = count
        return counts

    # -- documents -----------------------------------------------------------------------------
    def contributions_of(self, ranges: list[tuple[int, int]]) -> list[tuple[int, str]]:
        """(range number, contribution id) for each distinct contribution of the occurrences in each range."""
        lo = np.array([r[0] for r in ranges], dtype=np.int64)
        widths = np.array([r[1] - r[0] for r in ranges], dtype=np.int64)
        total = int(widths.sum()) if len(widths) else 0
        if not total:
            return []
        owner = np.repeat(np.arange(len(ranges), dtype=np.int64), widths)
        ranks = np.repeat(lo - np.cumsum(widths) + widths, widths) + np.arange(total)
        pointers = self.token_index(ranks).astype(np.uint64) * np.uint64(self.width)
        docs = np.searchsorted(self.offsets, pointers, side="right").astype(np.int64) - 1
        pairs = np.unique(owner * len(self.offsets) + docs).tolist()
        count = len(self.offsets)
        return [(pair // count, self.contributions[pair % count]) for pair in pairs]


class SpanSearch:
    """Maximal spans of a query in one or more indexes (one shard each), mapped to contributions."""

    def __init__(self, index_dirs: Sequence[Path], manifests: Sequence[IndexManifest], *,
                 load_to_ram: bool = False) -> None:
        self.shards = [_Shard(Path(d), m, load_to_ram) for d, m in zip(index_dirs, manifests, strict=True)]
        if not self.shards:
            raise ValueError("SpanSearch needs at least one index")
        self.width = self.shards[0].width
        self.vocab_size = manifests[0].vocab_size
        totals: dict[int, int] = {}
        for shard in self.shards:
            for token, count in shard.unigram_counts.items():
                totals[token] = totals.get(token, 0) + count
        total = sum(totals.values())
        if total != sum(shard.size for shard in self.shards):
            raise ValueError("unigram counts do not add up to the indexes' token streams")
        logprobs = np.full(self.vocab_size, MISSING_LOGPROB)
        for token, count in totals.items():
            if count > 0 and token < self.vocab_size:
                logprobs[token] = math.log(count) - math.log(total)  # libm log, as the engine's
        self._logprobs = logprobs.tolist()

    def spans(self, query: Sequence[int], min_len: int, max_count: int) -> list[MatchedSpan]:
        """The engine's `attribute(query, [], min_len, max_count, enforce_bow=False)`, as MatchedSpans."""
        n = len(query)
        if n == 0:
            return []
        ids = np.asarray(query, dtype=np.int64)
        keys = self._keys(ids)
        matches = [self._longest(shard, ids, keys, np.arange(n), np.full(n, n)) for shard in self.shards]
        found = np.zeros(n, dtype=np.int64)
        for shard, match in zip(self.shards, matches, strict=True):
            found = np.maximum(found, self._engine_length(shard, keys, match))
        kept: list[tuple[int, int, int, list[tuple[int, int]]]] = []  # start, end, count, ranges per shard
        last_end = 0
        for start in np.flatnonzero(found >= min_len).tolist():
            length = int(found[start])
            end = start + length
            if end <= last_end:
                continue
            ranges = [self._range(shard, ids, keys, match, start, length) for shard, match in zip(self.shards, matches,
                                                                                              strict=True)]
            count = sum(hi - lo for lo, hi in ranges)
            if count > max_count:
                continue
            last_end = end
            kept.append((start, end, count, ranges))
        contributions: list[set[str]] = [set() for _ in kept]
        for number, shard in enumerate(self.shards):
            for span, found_in in shard.contributions_of([ranges[number] for _, _, _, ranges in kept]):
                contributions[span].add(found_in)
        spans = []
        for (start, end, count, _), span_contributions in zip(kept, contributions, strict=True):
            logprob = 0.0
            for token in query[start:end]:
                logprob += self._logprobs[int(token)]
            spans.append(MatchedSpan(start=start, end=end, count=count, contribution_ids=tuple(sorted(span_contributions)),
                                     surprisal_nats=-logprob))
        return spans

    def longest_matches(self, query: Sequence[int]) -> list[int]:
        """The engine's `creativity`: for each position, the length of its longest match."""
        n = len(query)
        if n == 0:
            return []
        ids = np.asarray(query, dtype=np.int64)
        keys = self._keys(ids)
        found = np.zeros(n, dtype=np.int64)
        for shard in self.shards:
            match = self._longest(shard, ids, keys, np.arange(n), np.full(n, n))
            found = np.maximum(found, self._engine_length(shard, keys, match))
        return found.tolist()

    # -- internals -----------------------------------------------------------------------------
    def _keys(self, ids: np.ndarray) -> np.ndarray:
        dtype = f"<u{self.width}"
        return ids.astype(dtype).astype(f">u{self.width}").view(dtype).astype(np.int64)

    def _engine_length(self, shard: _Shard, keys: np.ndarray, match: _Match) -> np.ndarray:
        """The match lengths the engine reports: 0 where the unmatched query suffix sorts before rank 0."""
        n = len(keys)
        remaining = n - np.arange(n)
        suspect = np.flatnonzero((match.lo == 0) & (match.length > 0) & (match.length < remaining))
        if not len(suspect):
            return match.length
        length = match.length.copy()
        first = shard.token_index(np.zeros(1, dtype=np.int64))[0]
        index_key = shard.key_at(first + length[suspect])
        before = keys[suspect + length[suspect]] < index_key  # an ended suffix (-1) is before nothing
        length[suspect[before]] = 0
        return length

    def _range(self, shard: _Shard, ids: np.ndarray, keys: np.ndarray, match: _Match, start: int, length: int) -> tuple[int, int]:
        """Ranks of the occurrences of query[start:start+length] in this shard."""
        own = int(match.length[start])
        if own == length:
            return int(match.lo[start]), int(match.hi[start])
        if own < length:
            return 0, 0
        # this shard matched longer than the reported length (the engine's quirk in this shard): search again
        again = self._longest(shard, ids, keys, np.array([start]), np.array([start + length]))
        return int(again.lo[0]), int(again.hi[0])

    def _longest(self, shard: _Shard, ids: np.ndarray, keys: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> _Match:
        """For each start, the longest keys[start:end] occurring in the shard and its rank range."""
        sample_keys = _packed_prefixes(keys) if shard.sample is not None else []
        first = ids[starts]
        lo = shard.first_lo[first].astype(np.int64)
        hi = shard.first_hi[first].astype(np.int64)
        length = np.where(lo < hi, 1, 0).astype(np.int64)
        out_lo, out_hi = lo.copy(), hi.copy()
        active = np.flatnonzero((lo < hi) & (starts + 1 < ends))
        k = 1
        while len(active):
            narrow = (hi[active] - lo[active]) <= DIRECT_WIDTH
            if narrow.any():
                self._finish_directly(shard, keys, starts, ends, active[narrow], k, length, out_lo, out_hi)
                active = active[~narrow]
                if not len(active):
                    break
            a_lo, a_hi = lo[active], hi[active]
            target = keys[starts[active] + k]
            both_lo, both_hi = np.concatenate([a_lo, a_lo]), np.concatenate([a_hi, a_hi])
            if k < SAMPLE_TOKENS and shard.sample is not None:  # start from the sampled suffixes' bracket
                prefix = sample_keys[k][starts[active]]
                both_lo, both_hi = shard.bracket(both_lo, both_hi, np.concatenate(
                    [prefix, prefix + np.uint64(1 << (SAMPLE_BITS * (SAMPLE_TOKENS - k - 1)))]))
            both = shard.lower_bound(both_lo, both_hi, k, np.concatenate([target, target + 1]))
            new_lo, new_hi = both[: len(active)], both[len(active):]
            grew = new_lo < new_hi
            grown = active[grew]
            lo[grown], hi[grown] = new_lo[grew], new_hi[grew]
            out_lo[grown], out_hi[grown] = lo[grown], hi[grown]
            length[grown] = k + 1
            k += 1
            active = grown[starts[grown] + k < ends[grown]]
        return _Match(length=length, lo=out_lo, hi=out_hi)

    def _finish_directly(self, shard: _Shard, keys: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                         which: np.ndarray, k: int, length: np.ndarray, out_lo: np.ndarray,
                         out_hi: np.ndarray) -> None:
        """Positions `which` (ranges of <= DIRECT_WIDTH suffixes sharing k tokens): compare each suffix."""
        lo, hi = out_lo[which], out_hi[which]
        widths = hi - lo
        owner = np.repeat(np.arange(len(which)), widths)
        ranks = np.repeat(lo - np.cumsum(widths) + widths, widths) + np.arange(int(widths.sum()))
        suffix = shard.token_index(ranks) + k
        query_at = starts[which][owner] + k
        query_end = ends[which][owner]
        common = np.zeros(len(ranks), dtype=np.int64)
        going = np.arange(len(ranks))
        steps = np.arange(DIRECT_CHUNK)
        while len(going):
            q_index = query_at[going, None] + common[going, None] + steps
            in_query = q_index < query_end[going, None]
            s_keys = shard.key_at(suffix[going, None] + common[going, None] + steps)
            q_keys = keys[np.minimum(q_index, len(keys) - 1)]
            same = in_query & (s_keys == q_keys)
            run = np.where(same.all(axis=1), DIRECT_CHUNK, np.argmin(same, axis=1))
            common[going] += run
            going = going[run == DIRECT_CHUNK]
        best = np.zeros(len(which), dtype=np.int64)
        np.maximum.at(best, owner, common)
        on_best = common == best[owner]
        first_best = np.full(len(which), NO_RANK)
        np.minimum.at(first_best, owner[on_best], ranks[on_best])
        count_best = np.bincount(owner[on_best], minlength=len(which))
        length[which] = k + best
        out_lo[which] = first_best
        out_hi[which] = first_best + count_best
