"""Attributor: one engine over several indexes, regurgitation vs decoys, random text, empty lineage."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.attributor import MAX_CONTEXT_TOKENS, Attributor
from attribution.calibration import choose_min_span, exceedance, null_span_lengths, random_sequences
from attribution.index_builder import IndexManifest, build_index
from ledger.client.trace import TokenAttribution
from tests.attribution.passages import DOCUMENTS
from training.demo_passages import DEMO_DATANETS

DATANET = DEMO_DATANETS[0]


def cid(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def demo_index(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "v1"
    build_index([(cid(text), text) for text in (*DATANET.texts, *DATANET.decoys)], tokenizer_dir, out)
    return out


@pytest.fixture(scope="module")
def demo_attributor(demo_index: Path, tokenizer_dir: Path) -> Attributor:
    return Attributor([demo_index], tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def split_indexes(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("split")
    build_index(DOCUMENTS[:2], tokenizer_dir, root / "a")
    build_index(DOCUMENTS[2:], tokenizer_dir, root / "b")
    return [root / "a", root / "b"]


def totals(tokens: list[TokenAttribution]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for token in tokens:
        for contribution_id, weight in token.weights:
            sums[contribution_id] = sums.get(contribution_id, 0.0) + weight / len(tokens)
    return sums


def test_regurgitated_passage_goes_to_its_contribution_not_decoys(demo_attributor: Attributor, tokenize) -> None:  # type: ignore[no-untyped-def]
    decoys = {cid(text) for text in DATANET.decoys}
    for text in DATANET.texts:
        ids = tokenize(text)
        prompt_tokens = len(tokenize(" ".join(text.split()[:12])))
        tokens = demo_attributor.attribute(ids[:prompt_tokens], ids[prompt_tokens:])
        shares = totals(tokens)
        assert shares.get(cid(text), 0.0) >= 0.9, text
        assert sum(shares.get(decoy, 0.0) for decoy in decoys) <= 0.01


def test_random_tokens_are_unattributed(demo_attributor: Attributor, tokenizer_dir: Path) -> None:
    vocab = IndexManifest.load(demo_attributor.index_dirs[0]).vocab_size
    for sequence in random_sequences(vocab, 4, count=5, length=100):
        tokens = demo_attributor.attribute(sequence[:20], sequence[20:])
        assert math.fsum(t.unattributed for t in tokens) / len(tokens) >= 0.98


def test_two_indexes_map_documents_to_the_right_contribution(split_indexes: list[Path], tokenize) -> None:  # type: ignore[no-untyped-def]
    with Attributor(split_indexes) as attributor:
        assert attributor.engine.get_total_doc_cnt() == len(DOCUMENTS)
        for contribution_id, text in DOCUMENTS:
            ids = tokenize(text)
            shares = totals(attributor.attribute(ids[:10], ids[10:]))
            assert max(shares, key=shares.__getitem__) == contribution_id
            assert shares[contribution_id] >= 0.9
        # "salt marsh" passages live in both indexes (0 in a; 3 and 4 in b)
        (span,) = [s for s in attributor.spans(tokenize(" the salt marsh")) if s.length >= 3]
        assert set(span.contribution_ids) == {DOCUMENTS[0][0], DOCUMENTS[3][0], DOCUMENTS[4][0]}
    # the same order reversed still maps correctly
    with Attributor(list(reversed(split_indexes))) as attributor:
        ids = tokenize(DOCUMENTS[1][1])
        shares = totals(attributor.attribute([], ids))
        assert max(shares, key=shares.__getitem__) == DOCUMENTS[1][0]


def test_same_contribution_in_two_versions_counts_once(built: tuple[Path, IndexManifest], tokenizer_dir: Path,
                                                       tmp_path: Path, tokenize) -> None:  # type: ignore[no-untyped-def]
    build_index(DOCUMENTS, tokenizer_dir, tmp_path / "v2")
    with Attributor([built[0], tmp_path / "v2"]) as attributor:
        ids = tokenize(DOCUMENTS[2][1])
        shares = totals(attributor.attribute(ids[:10], ids[10:]))
        assert shares[DOCUMENTS[2][0]] >= 0.9


def test_empty_lineage_is_unattributed() -> None:
    with Attributor([]) as attributor:
        tokens = attributor.attribute([1, 2, 3], [4, 5])
        assert [t.unattributed for t in tokens] == [1.0, 1.0]
        assert attributor.attribute([1], []) == []
        assert attributor.longest_matches([1, 2]) == [0, 0]


def test_context_is_capped_and_only_completion_is_weighted(demo_attributor: Attributor, tokenize) -> None:  # type: ignore[no-untyped-def]
    ids = tokenize(DATANET.texts[0])
    filler = [7] * (MAX_CONTEXT_TOKENS + 50)
    tokens = demo_attributor.attribute(filler + ids[:12], ids[12:])
    assert len(tokens) == len(ids) - 12
    assert totals(tokens)[cid(DATANET.texts[0])] >= 0.9


def test_bad_tokens_and_mismatched_tokenizer(demo_attributor: Attributor, tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo_attributor.attribute([], [10**6])
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError):
        Attributor(demo_attributor.index_dirs, tokenizer_dir=other)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_weights_sum_to_one_for_random_queries(demo_attributor: Attributor, tokenize, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    words = " ".join(DATANET.texts).split() + ["zebra", "quantum", "banana"]
    context = " ".join(data.draw(st.lists(st.sampled_from(words), max_size=20)))
    completion = " ".join(data.draw(st.lists(st.sampled_from(words), max_size=40)))
    completion_ids = tokenize(completion)
    tokens = demo_attributor.attribute(tokenize(context), completion_ids)
    assert [t.token_id for t in tokens] == completion_ids
    for token in tokens:
        assert math.fsum(w for _, w in token.weights) + token.unattributed == pytest.approx(1, abs=1e-9)


def test_calibration_helpers(demo_attributor: Attributor) -> None:
    assert choose_min_span([]) == 1
    assert choose_min_span([1] * 99 + [5], 0.01) == 2
    assert choose_min_span([1] * 98 + [5, 5], 0.01) == 6
    assert choose_min_span([3] * 10, 0.0) == 4
    assert exceedance([1, 2, 3, 4], 3) == 0.5
    with pytest.raises(ValueError):
        choose_min_span([1], 1.0)
    rng = random.Random(1)
    lengths = null_span_lengths(demo_attributor, [rng.choices(range(4, 8000), k=50) for _ in range(3)])
    assert len(lengths) == 150 and max(lengths) <= 3


def test_concurrent_queries_agree(demo_attributor: Attributor, tokenize) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    queries = [tokenize(text) for text in (*DATANET.texts, *DATANET.decoys)]
    expected = [demo_attributor.attribute(ids[:8], ids[8:]) for ids in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda ids: demo_attributor.attribute(ids[:8], ids[8:]), queries * 3))
    assert results == expected * 3
