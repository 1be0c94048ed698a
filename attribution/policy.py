"""The attribution weighting policy: the one place that turns matched spans into per-token weights.

What this measures. Verbatim span matching measures *overlap* between generated text and indexed
contributions: a long, rare span shared with a contribution is strong evidence that the text was
copied (memorized) from it. It does not measure causal influence: a model can depend on a
contribution without repeating it, and can repeat a phrase it learned elsewhere. The gradient-influence
method for LoRA adapters (attribution/influence.py, weighted by `InfluenceWeighting` below) is the other
`AttributionMethod`; `CombinedPolicy` joins the two.

The span rule (`SpanWeightingPolicy`), in words:

1. Spans are maximal matches of the query (context tail + completion) in the lineage's indexes
   (infini-gram `attribute`). A span is *accepted* if it has at least `min_span_tokens` tokens (L0)
   and occurs at most `max_count` times. Only completion tokens receive weights, but a span may start
   in the context (a completion that continues a quoted passage is covered by the passage's span).
2. Each accepted span s gets evidence
       e_s = (length_s - L0 + 1) * rarity_s,
       rarity_s = clip(mean_surprisal_s / reference_surprisal_nats, rarity_floor, rarity_cap)
                  / contributions_s ** count_exponent
   where mean_surprisal_s is the mean unigram surprisal (-log p, nats) of the span's tokens in the
   index and contributions_s the number of *distinct* contributions containing it (occurrences are
   deduplicated: a contribution repeated across lineage versions, or a phrase repeated inside one
   document, counts once). Longer, rarer, more surprising spans give more evidence.
3. The span's evidence is split equally among its distinct contributions.
4. For a completion token t with evidence E_t (sum over accepted spans covering t), the attributed
   share is a_t = E_t / (E_t + half_share_evidence) -- so a borderline span (length L0, one
   contribution, typical surprisal) attributes half of a token and a long rare span nearly all of
   it -- split among contributions in proportion to their evidence; the rest, 1 - a_t, is
   explicitly *unattributed*. Weights plus unattributed sum to 1 per token.

The unattributed share is credited by `UnattributedPolicy` (see `lineage_allocation`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from ledger.client.trace import TokenAttribution

# Chosen from a null distribution by `python -m attribution.calibration`, for each embedded base model's
# tokenizer (attribution/calibration.json for the pretrained model, calibration-tiny.json for the tiny one):
# the smallest L such that at most 1% of positions of text that should not be attributed (random
# vocabulary tokens, unrelated English, the base model's own outputs) reach a match of >= L tokens.
DEFAULT_MIN_SPAN_TOKENS = 3
CALIBRATIONS_GLOB = "calibration*.json"


def calibrated_min_span(tokenizer_sha256: str) -> int:
    """L0 calibrated for this tokenizer; for one never calibrated, the largest L0 of all (the cautious side)."""
    records = [json.loads(path.read_text()) for path in sorted(Path(__file__).parent.glob(CALIBRATIONS_GLOB))]
    for record in records:
        if record["tokenizer_sha256"] == tokenizer_sha256:
            return int(record["min_span_tokens"])
    return max((int(record["min_span_tokens"]) for record in records), default=DEFAULT_MIN_SPAN_TOKENS)


@dataclass(frozen=True)
class MatchedSpan:
    """A maximal span of the query found in the lineage's indexes, as the policy sees it.

    `start`/`end` index the query (end exclusive); `count` is the engine's occurrence count;
    `contribution_ids` the distinct contributions containing it (deduplicated, sorted);
    `surprisal_nats` the span's summed unigram surprisal (-sum log p) in the index.
    """

    start: int
    end: int
    count: int
    contribution_ids: tuple[str, ...]
    surprisal_nats: float

    @property
    def length(self) -> int:
        return self.end - self.start


class AttributionMethod(Protocol):
    """Any per-token attribution method: verbatim spans (attribution/attributor.py `Attributor`) and gradient
    influence (attribution/influence.py `InfluenceScorer`)."""

    name: str

    def token_weights(self, context_ids: Sequence[int], completion_ids: Sequence[int]) -> list[TokenAttribution]:
        """One TokenAttribution per completion token, weights + unattributed summing to 1."""
        ...


@dataclass(frozen=True)
class SpanWeightingPolicy:
    """How matched spans become per-token contribution weights (the rule in the module docstring)."""

    min_span_tokens: int = DEFAULT_MIN_SPAN_TOKENS
    """L0: spans shorter than this are chance matches and ignored (calibrated, see attribution/calibration*.json)."""
    max_count: int = 1000
    """Spans occurring more often than this in the index are boilerplate and ignored (engine max_cnt)."""
    reference_surprisal_nats: float = 6.0
    """Mean unigram surprisal per token (nats) at which a span's rarity factor is 1."""
    rarity_floor: float = 0.25
    """Lower clip of the surprisal factor (a span of very common tokens still counts a little)."""
    rarity_cap: float = 4.0
    """Upper clip of the surprisal factor (unseen-ish tokens cannot dominate)."""
    count_exponent: float = 1.0
    """Evidence is divided by (distinct contributions containing the span) ** count_exponent."""
    half_share_evidence: float = 1.0
    """c in a_t = E_t / (E_t + c): the evidence at which a token is half attributed."""
    name: str = field(default="verbatim-span-v1")
    """Recorded as the trace's `method`."""

    def __post_init__(self) -> None:
        if not isinstance(self.min_span_tokens, int) or self.min_span_tokens < 1:
            raise ValueError(f"min_span_tokens must be an int >= 1, got {self.min_span_tokens!r}")
        if not isinstance(self.max_count, int) or self.max_count < 1:
            raise ValueError(f"max_count must be an int >= 1, got {self.max_count!r}")
        for name in ("reference_surprisal_nats", "rarity_floor", "rarity_cap", "half_share_evidence"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.rarity_floor > self.rarity_cap:
            raise ValueError("rarity_floor must be <= rarity_cap")
        if not math.isfinite(self.count_exponent) or self.count_exponent < 0:
            raise ValueError(f"count_exponent must be >= 0, got {self.count_exponent!r}")

    def accepts(self, span: MatchedSpan) -> bool:
        return span.length >= self.min_span_tokens and 0 < span.count <= self.max_count and bool(span.contribution_ids)

    def span_evidence(self, length: int, contributions: int, surprisal_nats: float) -> float:
        """e_s for an accepted span: non-decreasing in length and mean surprisal, non-increasing in contributions."""
        if length < self.min_span_tokens or contributions < 1:
            return 0.0
        mean_surprisal = max(0.0, surprisal_nats) / length
        factor = min(self.rarity_cap, max(self.rarity_floor, mean_surprisal / self.reference_surprisal_nats))
        return (length - self.min_span_tokens + 1) * factor / contributions ** self.count_exponent

    def attributed_share(self, evidence: float) -> float:
        """a_t = E / (E + c)."""
        return evidence / (evidence + self.half_share_evidence) if evidence > 0 else 0.0

    def token_weights(self, spans: Sequence[MatchedSpan], completion_ids: Sequence[int],
                      completion_start: int) -> list[TokenAttribution]:
        """Weights for the completion tokens, at query positions completion_start .. +len(completion_ids).

        Tokens covered by the same accepted spans get the same weights: they are computed once per
        run of such tokens, adding each span's share in span order (the sums are those of a token-by-token
        loop, bit for bit).
        """
        count = len(completion_ids)
        accepted = []  # (first, end) in completion positions, share per contribution, contributions
        for span in spans:
            if not self.accepts(span):
                continue
            first, end = max(span.start - completion_start, 0), min(span.end - completion_start, count)
            if first >= end:
                continue
            share = self.span_evidence(span.length, len(span.contribution_ids), span.surprisal_nats)
            accepted.append((first, end, share / len(span.contribution_ids), span.contribution_ids))
        bounds = sorted({0, count, *(a[0] for a in accepted), *(a[1] for a in accepted)})
        tokens: list[TokenAttribution] = []
        for low, high in zip(bounds, bounds[1:]):
            evidence: dict[str, float] = {}
            for first, end, share, contribution_ids in accepted:
                if first <= low and high <= end:
                    for contribution_id in contribution_ids:
                        evidence[contribution_id] = evidence.get(contribution_id, 0.0) + share
            tokens.extend(self._run_of_tokens(completion_ids[low:high], evidence))
        return tokens

    def _run_of_tokens(self, token_ids: Sequence[int], evidence: dict[str, float]) -> list[TokenAttribution]:
        """The attributions of tokens that share `evidence` (contribution -> summed evidence)."""
        total = math.fsum(evidence.values())
        if total <= 0:
            return [TokenAttribution.unattributed_token(int(token_id)) for token_id in token_ids]
        attributed = self.attributed_share(total)
        weights = tuple((cid, attributed * value / total) for cid, value in sorted(evidence.items()))
        unattributed = max(0.0, 1.0 - math.fsum(weight for _, weight in weights))
        first = TokenAttribution(token_id=int(token_ids[0]), weights=weights, unattributed=unattributed)
        return [first, *(_same_weights(first, int(token_id)) for token_id in token_ids[1:])]


def _same_weights(checked: TokenAttribution, token_id: int) -> TokenAttribution:
    """`checked` for another token id, without validating its weights again (they were, for `checked`)."""
    if token_id < 0:
        raise ValueError(f"token_id must be a non-negative int, got {token_id!r}")
    token = object.__new__(TokenAttribution)
    token.__dict__.update(token_id=token_id, weights=checked.weights, unattributed=checked.unattributed)
    return token


@dataclass(frozen=True)
class UnattributedPolicy:
    """Who is credited with a completion's unattributed share when it is served through an adapter.

    - "lineage_pro_rata" (default): the adapter was trained on its lineage's datanet versions, so the
      unattributed share is spread equally over the distinct contributions of those versions (each
      contribution gets unattributed / N). A base model (no lineage) credits nobody: the share stays
      with the protocol (returned as an empty allocation).
    - "treasury": nothing goes to contributors; the ledger books the whole share to the datanet
      treasury (returned as an empty allocation, the caller routes the remainder).
    The allocation never exceeds `unattributed_weight`; what it does not hand out is the remainder.
    """

    mode: Literal["lineage_pro_rata", "treasury"] = "lineage_pro_rata"

    def allocate(self, unattributed_weight: float, lineage_contribution_ids: Sequence[str]) -> dict[str, float]:
        if self.mode == "treasury":
            _check_weight(unattributed_weight)
            return {}
        return lineage_allocation(unattributed_weight, lineage_contribution_ids)


def lineage_allocation(unattributed_weight: float, lineage_contribution_ids: Sequence[str]) -> dict[str, float]:
    """Split `unattributed_weight` equally over the distinct lineage contribution ids.

    Empty lineage -> {} (nothing credited; the caller books the weight to the treasury).
    The values sum to `unattributed_weight` (up to float rounding).
    """
    _check_weight(unattributed_weight)
    distinct = sorted(set(lineage_contribution_ids))
    if not distinct or unattributed_weight == 0:
        return {}
    each = unattributed_weight / len(distinct)
    return {contribution_id: each for contribution_id in distinct}


def _check_weight(weight: float) -> None:
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"unattributed_weight must be a finite number >= 0, got {weight!r}")


@dataclass(frozen=True)
class InfluenceWeighting:
    """How influence scores (attribution/influence.py) become per-token weights.

    The gradient of a response says how much its probability rests on each contribution (score s_c), and
    how specifically it points at that contribution (the cosine of their gradients). The rule:

    1. The response's attributed share is a = clip((max_c cos_c - cosine_floor) / (cosine_full - cosine_floor),
       0, 1): a response whose gradient points at no contribution more than a response about none of the data
       does is left unattributed (its share goes by the unattributed policy).
    2. a is split among contributions with s_c > 0 in proportion to s_c ** sharpness.
    3. Influence is measured for the whole response, so every token of it gets the same weights.

    The defaults are the ones the counterfactual evaluation (attribution/counterfactual.py) chose on the
    pretrained model: the gate keeps the mass attributed to prompts about none of the data under 0.1, and
    squaring the scores puts more of the share on the contribution the response rests on most.
    """

    cosine_floor: float = 0.15
    cosine_full: float = 0.3
    sharpness: float = 2.0
    name: str = "lora-influence-v1"

    def __post_init__(self) -> None:
        if not (-1 <= self.cosine_floor < self.cosine_full <= 1):
            raise ValueError("need -1 <= cosine_floor < cosine_full <= 1")
        if not math.isfinite(self.sharpness) or self.sharpness <= 0:
            raise ValueError(f"sharpness must be a finite number > 0, got {self.sharpness!r}")

    def contribution_weights(self, contribution_ids: Sequence[str], scores: Sequence[float],
                             cosines: Sequence[float]) -> dict[str, float]:
        """contribution id -> weight; the weights sum to the attributed share."""
        if not contribution_ids:
            return {}
        share = (float(max(cosines)) - self.cosine_floor) / (self.cosine_full - self.cosine_floor)
        share = min(1.0, max(0.0, share))
        mass = {cid: float(score) ** self.sharpness for cid, score in zip(contribution_ids, scores, strict=True)
                if score > 0 and math.isfinite(score)}
        total = math.fsum(mass.values())
        if share <= 0 or total <= 0:
            return {}
        return {cid: share * value / total for cid, value in sorted(mass.items()) if value > 0}

    def token_weights(self, scores: object, completion_ids: Sequence[int]) -> list[TokenAttribution]:
        """`scores` is an attribution.influence.InfluenceScores (ids, scores, cosines) of this completion."""
        weights = self.contribution_weights(scores.contribution_ids, list(scores.scores),  # type: ignore[attr-defined]
                                            list(scores.cosines))  # type: ignore[attr-defined]
        return uniform_tokens(weights, completion_ids)


def uniform_tokens(weights: dict[str, float], completion_ids: Sequence[int]) -> list[TokenAttribution]:
    """Every token with the same contribution weights (the rest unattributed)."""
    if not completion_ids:
        return []
    if not weights:
        return [TokenAttribution.unattributed_token(int(token_id)) for token_id in completion_ids]
    pairs = tuple(sorted(weights.items()))
    first = TokenAttribution(token_id=int(completion_ids[0]), weights=pairs,
                             unattributed=max(0.0, 1.0 - math.fsum(w for _, w in pairs)))
    return [first, *(_same_weights(first, int(token_id)) for token_id in completion_ids[1:])]


@dataclass(frozen=True)
class CombinedPolicy:
    """Verbatim spans where they exist, influence where they do not.

    A token that verbatim matching attributes at all keeps its verbatim weights (a copied span is direct
    evidence); every other token takes the influence weights of the response.
    """

    name: str = "verbatim+influence-v1"

    def token_weights(self, verbatim: Sequence[TokenAttribution],
                      influence: Sequence[TokenAttribution]) -> list[TokenAttribution]:
        if len(verbatim) != len(influence):
            raise ValueError(f"{len(verbatim)} verbatim tokens but {len(influence)} influence tokens")
        return [span if span.attributed > 0 else gradient for span, gradient in zip(verbatim, influence, strict=True)]
