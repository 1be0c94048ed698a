"""Open a datanet version's attribution index (see index_builder) and query it by token ids.

Wraps infini_gram.engine.InfiniGramEngine. Token ids are the base tokenizer's; every query method
takes any sequence of ints (numpy ints included: the engine itself accepts only exact `int`).
The engine memory-maps the index files; a VersionIndex is read-only and safe to share across threads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attribution.index_builder import (
    CONTRIBUTIONS_FILE,
    OFFSETS_FILE,
    SUFFIX_ARRAY_FILE,
    TOKENS_FILE,
    TOKEN_DTYPES,
    IndexManifest,
    tokenizer_sha256,
    validate_index_path,
)

SCAN_CHUNK = 1 << 16  # suffix-array ranks read per step when collecting documents


@dataclass(frozen=True)
class SpanMatch:
    """A maximal span of the query found in the index (one element of `VersionIndex.attribute`).

    `start`/`end` are token positions in the query (end exclusive); `count` is how often the span
    occurs in the index; `doc_ixs` holds the document of each occurrence (one per occurrence, so a
    document repeats if the span occurs in it more than once), `contribution_ids` the same mapped
    to contributions; `pointers` the byte offsets of the occurrences in tokenized.0.
    `unigram_logprob_sum` is the sum over the span's tokens of log(token count / index tokens) when
    the index was opened with `unigram_logprobs=True`, else -10000 per token (the engine's default).
    """

    start: int
    end: int
    count: int
    doc_ixs: tuple[int, ...]
    contribution_ids: tuple[str, ...]
    pointers: tuple[int, ...]
    unigram_logprob_sum: float

    @property
    def length(self) -> int:
        return self.end - self.start


class VersionIndex:
    """One datanet version's index: n-gram counts, documents containing a phrase, maximal spans."""

    def __init__(self, index_dir: Path, *, load_to_ram: bool = False, unigram_logprobs: bool = False) -> None:
        from infini_gram.engine import InfiniGramEngine

        self.path = validate_index_path(index_dir)
        self.manifest = IndexManifest.load(self.path)
        for name in (TOKENS_FILE, SUFFIX_ARRAY_FILE, OFFSETS_FILE, CONTRIBUTIONS_FILE):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"attribution index {self.path} lacks {name}")
        self._contributions: list[str] = json.loads((self.path / CONTRIBUTIONS_FILE).read_text())
        if len(self._contributions) != self.manifest.doc_count:
            raise ValueError(f"{self.path}: {len(self._contributions)} contribution ids for "
                             f"{self.manifest.doc_count} documents")
        self._offsets = np.memmap(self.path / OFFSETS_FILE, dtype="<u8", mode="r")
        stored_tokens = (self.path / TOKENS_FILE).stat().st_size // TOKEN_DTYPES[self.manifest.token_dtype].itemsize
        table = np.memmap(self.path / SUFFIX_ARRAY_FILE, dtype=np.uint8, mode="r")
        if len(self._offsets) != self.manifest.doc_count or len(table) % stored_tokens:
            raise ValueError(f"{self.path}: index files do not match its manifest")
        self._table = table.reshape(stored_tokens, len(table) // stored_tokens)
        self._id_limit = self.manifest.doc_separator  # the separator is never a valid query token
        self.engine: Any = InfiniGramEngine(
            index_dir=str(self.path),
            eos_token_id=self.manifest.eos_token_id,
            vocab_size=self.manifest.vocab_size,
            version=self.manifest.layout_version,
            token_dtype=self.manifest.token_dtype,
            load_to_ram=load_to_ram,
            precompute_unigram_logprobs=unigram_logprobs,
        )

    # -- documents --------------------------------------------------------------------------------

    @property
    def doc_count(self) -> int:
        return self.manifest.doc_count

    def contribution_id(self, doc_ix: int) -> str:
        """The contribution id of document `doc_ix` (IndexError outside [0, doc_count))."""
        if not 0 <= doc_ix < len(self._contributions):
            raise IndexError(f"document {doc_ix} is outside [0, {len(self._contributions)})")
        return self._contributions[doc_ix]

    def doc_ixs_of_pointers(self, pointers: Sequence[int] | np.ndarray) -> np.ndarray:
        """Document numbers of byte offsets into tokenized.0 (e.g. `attribute` occurrence pointers)."""
        return np.searchsorted(self._offsets, np.asarray(pointers, dtype=np.uint64), side="right").astype(np.int64) - 1

    def document_tokens(self, doc_ix: int) -> list[int]:
        """The token ids of document `doc_ix`, as indexed."""
        self.contribution_id(doc_ix)
        result = self.engine.get_doc_by_ix(doc_ix, max_disp_len=max(1, self.manifest.token_count))
        return list(self._checked(result)["token_ids"])

    # -- queries ----------------------------------------------------------------------------------

    def count(self, token_ids: Sequence[int]) -> int:
        """Occurrences of the n-gram `token_ids` in the index (never across a document boundary).

        The empty n-gram counts every stored position (tokens plus one separator per document).
        """
        return int(self._checked(self.engine.count(self._query(token_ids)))["count"])

    def documents_containing(self, token_ids: Sequence[int], max_docs: int = 100) -> list[str]:
        """Contribution ids of up to `max_docs` distinct documents containing `token_ids`, by document order.

        When more than `max_docs` documents contain it, which ones are returned follows suffix-array
        order (deterministic for a given index, not the lowest document numbers).
        """
        query = self._query(token_ids)
        if not query:
            raise ValueError("documents_containing needs at least one token")
        if max_docs <= 0:
            raise ValueError("max_docs must be positive")
        found = self._checked(self.engine.find(query))
        (start, end), = found["segment_by_shard"]
        docs: set[int] = set()
        for chunk_start in range(start, end, SCAN_CHUNK):
            ranks = self._table[chunk_start : min(end, chunk_start + SCAN_CHUNK)]
            docs.update(self.doc_ixs_of_pointers(self._pointers(ranks)).tolist())
            if len(docs) >= max_docs:
                break
        return [self._contributions[ix] for ix in sorted(docs)[:max_docs]]

    def attribute(
        self,
        token_ids: Sequence[int],
        *,
        min_len: int = 1,
        max_count: int = 1000,
        delim_ids: Sequence[int] = (),
    ) -> list[SpanMatch]:
        """infini-gram's maximal-span search over `token_ids` (e.g. a generated completion).

        For every start position l the engine finds the longest span token_ids[l:r] occurring in the
        index (cut after the first token in `delim_ids`); spans shorter than `min_len` or occurring
        more than `max_count` times are dropped (dropped, not truncated); of the rest it keeps, left to
        right, only those ending further right than every span kept before (so no kept span lies
        inside another). Each kept span lists every occurrence (count <= max_count).
        """
        if min_len < 0 or max_count <= 0:
            raise ValueError("min_len must be >= 0 and max_count > 0")
        result = self._checked(self.engine.attribute(
            self._query(token_ids), delim_ids=self._query(delim_ids), min_len=min_len, max_cnt=max_count,
            enforce_bow=False,
        ))
        spans = []
        for span in result["spans"]:
            pointers = [doc["ptr"] for doc in span["docs"]]
            doc_ixs = self.doc_ixs_of_pointers(pointers).tolist()
            spans.append(SpanMatch(
                start=span["l"], end=span["r"], count=span["count"], doc_ixs=tuple(doc_ixs),
                contribution_ids=tuple(self._contributions[ix] for ix in doc_ixs), pointers=tuple(pointers),
                unigram_logprob_sum=span["unigram_logprob_sum"],
            ))
        return spans

    def check_tokenizer(self, tokenizer_dir: Path) -> None:
        """ValueError unless `tokenizer_dir` holds the tokenizer this index was built with."""
        actual = tokenizer_sha256(tokenizer_dir)
        if actual != self.manifest.tokenizer_sha256:
            raise ValueError(f"index {self.path} was built with tokenizer {self.manifest.tokenizer_sha256[:12]}…, "
                             f"not {actual[:12]}… ({tokenizer_dir})")

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the engine (its memory maps go with it)."""
        self.engine = None

    def __enter__(self) -> VersionIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------------

    def _query(self, token_ids: Sequence[int]) -> list[int]:
        if self.engine is None:
            raise RuntimeError(f"index {self.path} is closed")
        query = [int(token) for token in token_ids]
        for token in query:
            if not 0 <= token < self._id_limit:
                raise ValueError(f"token id {token} is outside [0, {self._id_limit})")
        return query

    def _pointers(self, rows: np.ndarray) -> np.ndarray:
        """Suffix-array rows (ratio bytes each, little-endian) to u64 byte offsets."""
        padded = np.zeros((len(rows), 8), dtype=np.uint8)
        padded[:, : rows.shape[1]] = rows
        return padded.view("<u8").ravel()

    @staticmethod
    def _checked(result: Any) -> Any:
        if isinstance(result, dict) and "error" in result:
            raise ValueError(f"infini-gram: {result['error']}")
        return result


def open_index(
    index_dir: Path,
    *,
    load_to_ram: bool = False,
    unigram_logprobs: bool = False,
    tokenizer_dir: Path | None = None,
) -> VersionIndex:
    """Open an index built by `build_index`; with `tokenizer_dir`, check it is the index's tokenizer."""
    index = VersionIndex(index_dir, load_to_ram=load_to_ram, unigram_logprobs=unigram_logprobs)
    if tokenizer_dir is not None:
        index.check_tokenizer(tokenizer_dir)
    return index
