"""The explorer's model of a trace: token texts with the demo's byte-level tokenizer, leaders, spans, shares."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ledger.client.trace import AttributionTrace, TokenAttribution
from portal.registry_view import ContributionView
from portal.server import token_decoder
from portal.trace_view import colour_of, explore, token_texts

ALICE, BOB = "0x" + "a1" * 20, "0x" + "b2" * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    from training.demo_assets import build_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json")), token_decoder(folder)


def contribution(cid: str, contributor: str) -> ContributionView:
    return ContributionView(id=cid, datanet="rivers", datanet_id="d" * 32, contributor=contributor, status="published",
                            version=1, bytes=10, license="CC-BY-4.0", text="x", created_at=datetime.now(UTC))


def test_token_texts_add_up_to_the_completion_and_split_no_character(tokenizer) -> None:  # type: ignore[no-untyped-def]
    encoder, decode = tokenizer
    text = "Café au lait ☕ costs 3 € — naïve façade, 日本語 too."
    ids = encoder.encode(text).ids
    texts = token_texts(ids, decode)
    assert len(texts) == len(ids)
    assert "".join(texts) == decode(ids) == text
    assert not any("\ufffd" in piece for piece in texts), "a multi-byte character lands on one token"
    assert "" in texts, "this text has characters split over several byte-level tokens"
    # a completion cut inside a character keeps what decodes on its last token
    cut = ids[: next(n for n in range(1, len(ids) + 1) if decode(ids[:n]).endswith("\ufffd"))]
    assert "".join(token_texts(cut, decode)) == decode(cut)


def test_leaders_spans_and_shares_follow_the_weights() -> None:
    a1, a2, b1 = "a1" * 32, "a2" * 32, "b1" * 32
    known = {a1: contribution(a1, ALICE), a2: contribution(a2, ALICE), b1: contribution(b1, BOB)}
    tokens = (
        TokenAttribution(1, ((a1, 0.3), (a2, 0.3), (b1, 0.4)), 0.0),  # Alice leads with 0.6 over two texts
        TokenAttribution(2, ((b1, 0.9),), 0.1),
        TokenAttribution(3, ((b1, 1.0),), 0.0),
        TokenAttribution(4, (), 1.0),
        TokenAttribution(5, (("ff" * 32, 1.0),), 0.0),  # a contribution the registry does not know
    )
    trace = AttributionTrace("t", "m", "m", None, 1, len(tokens), tokens, "verbatim-span-v1")
    view = explore(trace, known, lambda ids: "".join(f"<{i}>" for i in ids))
    assert [(t.text, t.contributor, t.weight) for t in view.tokens] == [
        ("<1>", ALICE, pytest.approx(0.6)), ("<2>", BOB, 0.9), ("<3>", BOB, 1.0), ("<4>", None, 0.0),
        ("<5>", None, 0.0)]
    assert view.tokens[0].contribution_id == b1, "the span follows the single largest contribution"
    assert view.tokens[0].colour == colour_of(ALICE) and view.tokens[3].colour == ""
    assert [(s.start, s.end, s.text, s.contribution_id, s.contributor) for s in view.spans] == [
        (0, 3, "<1><2><3>", b1, BOB), (4, 5, "<5>", "ff" * 32, None)]
    assert [(c.address, round(c.share, 9), c.tokens) for c in view.contributors] == [
        (BOB, round(2.3 / 5, 9), 2), (ALICE, round(0.6 / 5, 9), 1)]
