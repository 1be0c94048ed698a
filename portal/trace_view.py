"""The attribution explorer's model of one trace: tokens coloured by contributor, spans, the fee split.

A token's *contributor* is the address whose contributions hold the largest share of it (the shares of
one address's contributions added up); its *weight* is that share. A *span* is a run of consecutive
tokens whose largest share goes to the same contribution: it links to that contribution's text. The
colour of an address is fixed by its hash, so it is the same on every page and in every session.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ledger.client.trace import AttributionTrace
from portal.registry_view import ContributionView

ROLE_ORDER = ("payer", "contributor", "adapter_owner", "treasury")


def colour_of(address: str) -> str:
    """A stable, readable background colour for an address (CSS hsl)."""
    digest = hashlib.sha256(address.lower().encode()).digest()
    hue = int.from_bytes(digest[:2], "big") % 360
    return f"hsl({hue} 70% 78%)"


@dataclass(frozen=True)
class TokenView:
    index: int
    token_id: int
    text: str
    contributor: str | None  # None: unattributed
    weight: float  # the contributor's share of this token (0 when unattributed)
    contribution_id: str | None  # the single contribution with the largest share
    weights: tuple[tuple[str, float], ...]  # every contribution's share, largest first
    choice: int

    @property
    def colour(self) -> str:
        return colour_of(self.contributor) if self.contributor else ""


@dataclass(frozen=True)
class SpanView:
    start: int  # first token index
    end: int  # one past the last
    text: str
    contribution_id: str
    contributor: str | None
    datanet: str | None


@dataclass(frozen=True)
class ContributorShare:
    address: str
    share: float  # of the completion's tokens
    tokens: int  # tokens on which this address holds the largest share

    @property
    def colour(self) -> str:
        return colour_of(self.address)


@dataclass(frozen=True)
class ExplorerView:
    trace: AttributionTrace
    tokens: tuple[TokenView, ...]
    spans: tuple[SpanView, ...]
    contributors: tuple[ContributorShare, ...]
    contributions: dict[str, ContributionView]


def token_texts(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[str]:
    """Each token's text, so that their concatenation is the decoded completion (multi-byte characters
    split over several tokens land on the token that completes them)."""
    texts: list[str] = []
    previous = current = ""
    for n in range(1, len(token_ids) + 1):
        current = decode(list(token_ids[:n]))
        if current.startswith(previous) and not current.endswith("\ufffd"):
            texts.append(current[len(previous):])
            previous = current
        else:
            texts.append("")
    if current.startswith(previous) and current != previous:  # the completion ends inside a character
        texts[-1] += current[len(previous):]
    return texts


def explore(trace: AttributionTrace, contributions: dict[str, ContributionView],
            decode: Callable[[list[int]], str]) -> ExplorerView:
    """The explorer's model of `trace`; `contributions` maps the trace's contribution ids to the registry's rows
    (an id the registry does not know is shown by id, without an address)."""
    texts = token_texts(trace.token_ids, decode)
    choice_of = [c for c, count in enumerate(trace.choices) for _ in range(count)]
    tokens: list[TokenView] = []
    for index, (token, text) in enumerate(zip(trace.tokens, texts)):
        by_address: dict[str, float] = {}
        for cid, weight in token.weights:
            known = contributions.get(cid)
            if known is not None:
                by_address[known.contributor] = by_address.get(known.contributor, 0.0) + weight
        ranked = tuple(sorted(token.weights, key=lambda item: (-item[1], item[0])))
        top_address = max(by_address.items(), key=lambda item: (item[1], item[0]), default=(None, 0.0))
        tokens.append(TokenView(
            index=index, token_id=token.token_id, text=text, contributor=top_address[0], weight=top_address[1],
            contribution_id=ranked[0][0] if ranked and ranked[0][1] > 0 else None, weights=ranked,
            choice=choice_of[index] if index < len(choice_of) else 0,
        ))
    return ExplorerView(trace, tuple(tokens), tuple(_spans(tokens, contributions)),
                        _shares(trace, tokens, contributions), contributions)


def _spans(tokens: list[TokenView], contributions: dict[str, ContributionView]) -> list[SpanView]:
    spans: list[SpanView] = []
    start = 0
    for index in range(1, len(tokens) + 1):
        here = tokens[start]
        if index < len(tokens) and tokens[index].contribution_id == here.contribution_id \
                and tokens[index].choice == here.choice:
            continue
        if here.contribution_id is not None:
            known = contributions.get(here.contribution_id)
            spans.append(SpanView(start, index, "".join(t.text for t in tokens[start:index]), here.contribution_id,
                                  known.contributor if known else None, known.datanet if known else None))
        start = index
    return spans


def _shares(trace: AttributionTrace, tokens: list[TokenView],
            contributions: dict[str, ContributionView]) -> tuple[ContributorShare, ...]:
    share: dict[str, float] = {}
    for cid, fraction in trace.contribution_totals().items():
        known = contributions.get(cid)
        if known is not None:
            share[known.contributor] = share.get(known.contributor, 0.0) + fraction
    leading: dict[str, int] = {}
    for token in tokens:
        if token.contributor:
            leading[token.contributor] = leading.get(token.contributor, 0) + 1
    return tuple(ContributorShare(address, value, leading.get(address, 0))
                 for address, value in sorted(share.items(), key=lambda item: (-item[1], item[0])))
