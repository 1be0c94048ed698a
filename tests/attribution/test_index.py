"""The attribution index: built with infini-gram's indexer over base-model token ids, queried by token ids."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from attribution import index_builder
from attribution.index_builder import RESERVED_PATH_WORDS, IndexManifest, build_index, build_suffix_array
from attribution.index_reader import VersionIndex, open_index
from tests.attribution.passages import DOCUMENTS, PASSAGES

ONCE = " copper lanterns swing above the ferry landing"
TWICE = " the granary roof leaks whenever"
THRICE = " salt marsh"
NEVER = " copper lanterns swing above the granary"


def ids_of(*doc_ixs: int) -> list[str]:
    return [DOCUMENTS[i][0] for i in doc_ixs]


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# -- queries ----------------------------------------------------------------------------------------


def test_ngram_counts(index: VersionIndex, tokenize) -> None:  # type: ignore[no-untyped-def]
    assert len(tokenize(ONCE)) >= 6
    assert index.count(tokenize(ONCE)) == 1
    assert index.count(tokenize(TWICE)) == 2
    assert index.count(tokenize(THRICE)) == 3
    assert index.count(tokenize(NEVER)) == 0
    assert index.count(np.array(tokenize(TWICE), dtype=np.int32)) == 2, "numpy ints are accepted"
    assert index.count([]) == index.manifest.token_count + index.manifest.doc_count


def test_phrases_map_to_their_contributions(index: VersionIndex, tokenize) -> None:  # type: ignore[no-untyped-def]
    assert index.documents_containing(tokenize(ONCE), max_docs=10) == ids_of(0)
    assert index.documents_containing(tokenize(TWICE), max_docs=10) == ids_of(1, 2)
    assert index.documents_containing(tokenize(THRICE), max_docs=10) == ids_of(0, 3, 4)
    assert index.documents_containing(tokenize(NEVER), max_docs=10) == []
    limited = index.documents_containing(tokenize(THRICE), max_docs=2)
    assert len(limited) == 2 and set(limited) <= set(ids_of(0, 3, 4))
    with pytest.raises(ValueError, match="at least one token"):
        index.documents_containing([], max_docs=1)


def test_documents_are_the_tokenized_texts_in_order(index: VersionIndex, tokenize) -> None:  # type: ignore[no-untyped-def]
    assert index.doc_count == len(DOCUMENTS)
    for doc_ix, (cid, text) in enumerate(DOCUMENTS):
        assert index.contribution_id(doc_ix) == cid
        assert index.document_tokens(doc_ix) == tokenize(text)
    with pytest.raises(IndexError):
        index.contribution_id(len(DOCUMENTS))


def test_no_match_across_a_document_boundary(index: VersionIndex) -> None:
    tail, head = index.document_tokens(1)[-4:], index.document_tokens(2)[:4]
    assert index.count(tail) >= 1 and index.count(head) >= 1
    assert index.count(tail + head) == 0, "documents 1 and 2 are adjacent in the token stream"
    assert index.count(tail[-1:] + head[:1]) == 0
    spans = index.attribute(tail + head, min_len=1)
    assert [(s.start, s.end, s.contribution_ids) for s in spans] == [(0, 4, tuple(ids_of(1))), (4, 8, tuple(ids_of(2)))]


def test_token_ids_are_checked(index: VersionIndex) -> None:
    with pytest.raises(ValueError, match="outside"):
        index.count([index.manifest.doc_separator])
    with pytest.raises(ValueError, match="outside"):
        index.count([-1])


# -- attribute(): maximal spans, the next step's building block ---------------------------------------


def test_attribute_finds_maximal_spans_and_their_documents(index: VersionIndex, tokenize) -> None:  # type: ignore[no-untyped-def]
    pieces = [tokenize("Yesterday I saw how"), tokenize(ONCE), tokenize(", we think,"), tokenize(TWICE),
              tokenize(" we sing.")]
    response = [token for piece in pieces for token in piece]
    once_at = len(pieces[0])
    twice_at = once_at + len(pieces[1]) + len(pieces[2])
    spans = index.attribute(response, min_len=5)

    assert [(s.start, s.end, s.count) for s in spans] == [
        (once_at, once_at + len(pieces[1]), 1),
        (twice_at, twice_at + len(pieces[3]), 2),
    ]
    once, twice = spans
    assert once.contribution_ids == tuple(ids_of(0)) and once.doc_ixs == (0,) and once.length == len(pieces[1])
    assert index.doc_ixs_of_pointers(list(once.pointers)).tolist() == [0]
    assert index.document_tokens(0)[once.pointers[0] // 2 - 1 :][: once.length] == pieces[1], (
        "a pointer is the byte offset of the occurrence in tokenized.0 (separators included)")
    assert sorted(twice.contribution_ids) == sorted(ids_of(1, 2)), "one entry per occurrence"
    assert index.attribute(response, min_len=100) == []


def test_attribute_drops_spans_more_frequent_than_max_count(index: VersionIndex, tokenize) -> None:  # type: ignore[no-untyped-def]
    response = tokenize(TWICE)
    assert [s.count for s in index.attribute(response, min_len=len(response))] == [2]
    assert index.attribute(response, min_len=len(response), max_count=1) == [], "dropped, not truncated"
    assert index.attribute(tokenize(NEVER), min_len=len(tokenize(NEVER))) == []


def test_span_logprob_sum_uses_token_frequencies(built: tuple[Path, IndexManifest], tokenize) -> None:  # type: ignore[no-untyped-def]
    out_dir, manifest = built
    with open_index(out_dir, unigram_logprobs=True) as index:
        span = index.attribute(tokenize(ONCE), min_len=2)[0]
        stored = manifest.token_count + manifest.doc_count
        expected = sum(math.log(index.count([t]) / stored) for t in tokenize(ONCE)[span.start : span.end])
        assert span.unigram_logprob_sum == pytest.approx(expected)
    with open_index(out_dir) as index:
        span = index.attribute(tokenize(ONCE), min_len=2)[0]
        assert span.unigram_logprob_sum == -10000.0 * span.length


# -- on-disk format and manifest --------------------------------------------------------------------


def test_manifest_and_files(built: tuple[Path, IndexManifest], tokenizer_dir: Path, tokenize) -> None:  # type: ignore[no-untyped-def]
    out_dir, manifest = built
    lengths = [len(tokenize(text)) for text in PASSAGES]
    assert manifest == IndexManifest.load(out_dir)
    assert json.loads((out_dir / "manifest.json").read_text())["doc_count"] == len(PASSAGES)
    assert (manifest.format, manifest.format_version, manifest.engine, manifest.layout_version) == (
        "datanet-gateway/attribution-index", 1, "infini-gram", 4)
    assert (manifest.token_dtype, manifest.doc_separator, manifest.vocab_size) == ("u16", 0xFFFF, 8192)
    assert manifest.eos_token_id == 2  # "</s>" in the demo tokenizer
    assert manifest.tokenizer_sha256 == hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert (manifest.doc_count, manifest.token_count) == (len(PASSAGES), sum(lengths))
    assert 0 <= manifest.build_seconds < 60 and manifest.built_at.endswith("+00:00")
    contributions = (out_dir / "contributions.json").read_bytes()
    assert json.loads(contributions) == [cid for cid, _ in DOCUMENTS]
    assert manifest.contributions_sha256 == hashlib.sha256(contributions).hexdigest()

    assert entries(out_dir) == ["contributions.json", "manifest.json", "offset.0", "table.0", "tokenized.0",
                                "unigram.0"]
    stream = np.fromfile(out_dir / "tokenized.0", dtype="<u2")
    offsets = np.fromfile(out_dir / "offset.0", dtype="<u8")
    assert offsets.tolist() == [2 * (i + sum(lengths[:i])) for i in range(len(lengths))]
    assert (stream[offsets // 2] == 0xFFFF).all() and (stream == 0xFFFF).sum() == len(PASSAGES)
    assert stream[1 : 1 + lengths[0]].tolist() == tokenize(PASSAGES[0])
    ratio = (out_dir / "table.0").stat().st_size // len(stream)
    assert ratio * len(stream) == (out_dir / "table.0").stat().st_size
    unigram = dict(map(int, line.split()) for line in (out_dir / "unigram.0").read_text().splitlines())
    assert sum(unigram.values()) == len(stream) and unigram[0xFFFF] == len(PASSAGES)


def test_open_checks_the_tokenizer(built: tuple[Path, IndexManifest], tokenizer_dir: Path, tmp_path: Path) -> None:
    out_dir, _ = built
    open_index(out_dir, tokenizer_dir=tokenizer_dir).close()
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tokenizer_dir, other)
    (other / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text() + "\n")
    with pytest.raises(ValueError, match="was built with tokenizer"):
        open_index(out_dir, tokenizer_dir=other)
    with pytest.raises(FileNotFoundError, match="not an attribution index"):
        open_index(tmp_path)


# -- building: validation and atomicity ---------------------------------------------------------------


def test_an_index_appears_whole_and_leaves_nothing_beside_it(tokenizer_dir: Path, tmp_path: Path) -> None:
    seen_while_building: list[list[str]] = []

    def watch(message: str) -> None:
        if message.startswith("suffix array: merging"):
            seen_while_building.append(entries(tmp_path))

    manifest = build_index(DOCUMENTS[:2], tokenizer_dir, tmp_path / "v1", progress=watch)
    [during] = seen_while_building
    assert len(during) == 1 and during[0].startswith(".v1.building-"), "built in a hidden sibling"
    assert entries(tmp_path) == ["v1"] and manifest.doc_count == 2
    with pytest.raises(FileExistsError):
        build_index(DOCUMENTS[:2], tokenizer_dir, tmp_path / "v1")
    assert entries(tmp_path) == ["v1"]


def failing_documents() -> Iterator[tuple[str, str]]:
    yield DOCUMENTS[0]
    yield DOCUMENTS[1]
    raise OSError("database connection lost")


def test_a_failure_while_reading_documents_leaves_nothing(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="connection lost"):
        build_index(failing_documents(), tokenizer_dir, tmp_path / "v1")
    assert entries(tmp_path) == []


def test_a_failure_while_sorting_leaves_nothing(tokenizer_dir: Path, tmp_path: Path) -> None:
    def interrupt(message: str) -> None:
        if message.startswith("suffix array: merging"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(DOCUMENTS, tokenizer_dir, tmp_path / "v1", progress=interrupt)
    assert entries(tmp_path) == []


def test_an_indexer_failure_is_reported_and_leaves_nothing(tokenizer_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_builder, "indexer_binary", lambda: Path("/bin/false"))
    with pytest.raises(RuntimeError, match="indexer step make-part failed"):
        build_index(DOCUMENTS, tokenizer_dir, tmp_path / "v1")
    assert entries(tmp_path) == []


def test_reserved_words_in_the_path_are_rejected(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("paths")
    for word in RESERVED_PATH_WORDS:
        for out_dir in (base / f"my-{word}s" / "v1", base / f"v1-{word}"):
            with pytest.raises(ValueError, match=f"contains '{word}'"):
                build_index(DOCUMENTS, tokenizer_dir, out_dir)
            with pytest.raises(ValueError, match="must not contain"):
                open_index(out_dir)
    assert entries(base) == []
    build_index(DOCUMENTS[:1], tokenizer_dir, base / "datanet-7" / "v1")  # the control: an ordinary path works


def test_no_documents_is_rejected(tokenizer_dir: Path, tmp_path: Path) -> None:
    for documents in ([], iter([])):
        with pytest.raises(ValueError, match="no documents"):
            build_index(documents, tokenizer_dir, tmp_path / "v1")
    assert entries(tmp_path) == []


@pytest.mark.parametrize("documents, message", [
    ([("not-hex", "text")], "hex string"),
    ([(DOCUMENTS[0][0], "one"), (DOCUMENTS[0][0], "two")], "appears twice"),
    ([(DOCUMENTS[0][0], b"bytes")], "must be a str"),
    (["just text"], "pairs"),
])
def test_bad_documents_are_rejected(tokenizer_dir: Path, tmp_path: Path, documents: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_index(documents, tokenizer_dir, tmp_path / "v1")
    assert entries(tmp_path) == []


def test_empty_texts_are_documents_too(tokenizer_dir: Path, tmp_path: Path) -> None:
    documents = [("aa", ""), DOCUMENTS[0], ("bb", "")]
    manifest = build_index(documents, tokenizer_dir, tmp_path / "v1")
    with open_index(tmp_path / "v1") as index:
        assert manifest.doc_count == 3 and index.document_tokens(0) == [] and index.document_tokens(2) == []
        assert index.documents_containing(index.document_tokens(1)[:5]) == [DOCUMENTS[0][0]]


# -- the suffix array itself, split into parts as for large datanets -------------------------------------


def test_a_suffix_array_sorted_in_parts_orders_every_document_suffix(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With several parts (one per core on big inputs), suffixes must still sort exactly up to the
    end of their document: a query never contains the separator, so nothing past it matters."""
    rng = np.random.default_rng(5)
    phrase = rng.integers(0, 40, size=30)
    docs = []
    for _ in range(300):  # short random documents, many sharing a 30-token phrase (long common prefixes)
        doc = rng.integers(0, 40, size=int(rng.integers(0, 60)))
        if rng.random() < 0.5:
            at = int(rng.integers(0, len(doc) + 1))
            doc = np.concatenate([doc[:at], phrase, doc[at:]])
        docs.append(np.concatenate([[0xFFFF], doc]))
    stream = np.concatenate(docs).astype("<u2")
    stream.tofile(tmp_path / "tokens.bin")
    longest = max(len(d) for d in docs) * 2
    monkeypatch.setattr(index_builder, "MIN_HACK_BYTES", 0)  # parts get only just enough extra context
    build_suffix_array(tmp_path / "tokens.bin", tmp_path / "sa.bin", tmp_path / "scratch", token_width=2,
                       longest_document_bytes=longest, parts=4)
    assert not (tmp_path / "scratch").exists()
    raw = np.fromfile(tmp_path / "sa.bin", dtype=np.uint8)
    ratio = len(raw) // len(stream)
    padded = np.zeros((len(stream), 8), dtype=np.uint8)
    padded[:, :ratio] = raw.reshape(len(stream), ratio)
    pointers = padded.view("<u8").ravel() // 2
    assert sorted(pointers.tolist()) == list(range(len(stream)))

    data = stream.tobytes()  # the engine compares suffixes byte by byte, as stored (little-endian)
    ends = np.flatnonzero(stream == 0xFFFF)

    def key(position: int) -> bytes:  # the suffix up to and including the next separator
        following = ends[ends > position]
        stop = int(following[0]) + 1 if len(following) else len(stream)
        return data[2 * position : 2 * stop]

    keys = [key(int(p)) for p in pointers]
    assert all(a <= b for a, b in zip(keys, keys[1:])), "suffixes are sorted up to their document's end"
