"""Attribution traces: per completion token, which contributions it derives from and how much.

Guarantees (checked in `__post_init__`, ValueError otherwise):
- every weight is finite and >= 0, and so is every token's `unattributed` share;
- per token, the contribution weights plus `unattributed` sum to 1 (within `SUM_TOLERANCE`);
- a token lists each contribution id at most once;
- `completion_tokens == len(tokens)`;
- with several choices (`n > 1`), `choice_tokens` gives each choice's token count, in order, and sums
  to `completion_tokens`: `tokens` holds choice 0's tokens, then choice 1's, and so on.

`recovered` marks a trace rebuilt from a durable usage record after its replica died or its first
attribution failed to reach the outbox (attribution/usage_log.py); the ledger treats such a trace
as a duplicate when it already holds the id, whatever its content, so a response is billed once.

What a weight means: the share of that token credited to a contribution by the attribution method
named in `method` (see attribution/policy.py). For the verbatim-span method it measures *overlap*
between the generated text and indexed contributions, not causal influence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUM_TOLERANCE = 1e-9


@dataclass(frozen=True)
class TokenAttribution:
    """One completion token: `weights` maps contribution id (hex) -> share; the rest is unattributed."""

    token_id: int
    weights: tuple[tuple[str, float], ...]
    unattributed: float

    def __post_init__(self) -> None:
        if not isinstance(self.token_id, int) or isinstance(self.token_id, bool) or self.token_id < 0:
            raise ValueError(f"token_id must be a non-negative int, got {self.token_id!r}")
        seen: set[str] = set()
        total = 0.0
        for contribution_id, weight in self.weights:
            if not isinstance(contribution_id, str) or not contribution_id:
                raise ValueError(f"contribution id must be a non-empty string, got {contribution_id!r}")
            if contribution_id in seen:
                raise ValueError(f"contribution {contribution_id} appears twice in one token's weights")
            seen.add(contribution_id)
            if not _is_share(weight):
                raise ValueError(f"weight of {contribution_id} must be a finite number >= 0, got {weight!r}")
            total += weight
        if not _is_share(self.unattributed):
            raise ValueError(f"unattributed must be a finite number >= 0, got {self.unattributed!r}")
        if abs(total + self.unattributed - 1.0) > SUM_TOLERANCE:
            raise ValueError(f"token {self.token_id}: weights ({total!r}) + unattributed ({self.unattributed!r}) != 1")

    @property
    def attributed(self) -> float:
        return 1.0 - self.unattributed

    @classmethod
    def unattributed_token(cls, token_id: int) -> TokenAttribution:
        return cls(token_id=token_id, weights=(), unattributed=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "weights": [[cid, weight] for cid, weight in self.weights],
                "unattributed": self.unattributed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenAttribution:
        return cls(token_id=data["token_id"], weights=tuple((str(cid), float(w)) for cid, w in data["weights"]),
                   unattributed=float(data["unattributed"]))


@dataclass(frozen=True)
class AttributionTrace:
    """The attribution of one inference: one `TokenAttribution` per completion token.

    An empty completion (`completion_tokens == 0`) has nothing to attribute: by definition its
    `unattributed_fraction` is 1.0 and `attributed_fraction` 0.0, and `contribution_totals()` is empty.
    """

    trace_id: str
    model: str
    adapter: str | None
    requester: str | None
    prompt_tokens: int
    completion_tokens: int
    tokens: tuple[TokenAttribution, ...]
    method: str
    choice_tokens: tuple[int, ...] = ()  # per choice; () means one choice of `completion_tokens`
    recovered: bool = False

    def __post_init__(self) -> None:
        if not self.trace_id:
            raise ValueError("trace_id must be non-empty")
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.completion_tokens != len(self.tokens):
            raise ValueError(f"completion_tokens is {self.completion_tokens} but there are {len(self.tokens)} tokens")
        if not all(isinstance(token, TokenAttribution) for token in self.tokens):
            raise ValueError("tokens must be TokenAttribution instances")
        if self.choice_tokens:
            if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in self.choice_tokens):
                raise ValueError(f"choice_tokens must be non-negative ints, got {self.choice_tokens!r}")
            if sum(self.choice_tokens) != self.completion_tokens:
                raise ValueError(f"choice_tokens {list(self.choice_tokens)} do not sum to completion_tokens "
                                 f"{self.completion_tokens}")
            object.__setattr__(self, "choice_tokens", tuple(self.choice_tokens) if len(self.choice_tokens) > 1 else ())

    @property
    def choices(self) -> tuple[int, ...]:
        """Each choice's completion token count (one choice unless `choice_tokens` says otherwise)."""
        return self.choice_tokens or (self.completion_tokens,)

    @property
    def unattributed_fraction(self) -> float:
        """Mean unattributed share over completion tokens (1.0 for an empty completion)."""
        if not self.tokens:
            return 1.0
        return math.fsum(token.unattributed for token in self.tokens) / self.completion_tokens

    @property
    def attributed_fraction(self) -> float:
        """Mean attributed share over completion tokens (0.0 for an empty completion)."""
        return 1.0 - self.unattributed_fraction

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for token in self.tokens]

    def contribution_totals(self) -> dict[str, float]:
        """Contribution id -> its weight summed over tokens, divided by completion_tokens (a fraction of the completion)."""
        sums: dict[str, list[float]] = {}
        for token in self.tokens:
            for contribution_id, weight in token.weights:
                sums.setdefault(contribution_id, []).append(weight)
        return {cid: math.fsum(weights) / self.completion_tokens for cid, weights in sums.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; `from_dict(to_dict())` == self exactly (floats survive JSON round trips)."""
        return {
            "trace_id": self.trace_id, "model": self.model, "adapter": self.adapter, "requester": self.requester,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "method": self.method, "tokens": [token.to_dict() for token in self.tokens],
            # Only when set, so a one-choice trace keeps the content hash it always had.
            **({"choice_tokens": list(self.choice_tokens)} if len(self.choice_tokens) > 1 else {}),
            **({"recovered": True} if self.recovered else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttributionTrace:
        return cls(
            trace_id=data["trace_id"], model=data["model"], adapter=data["adapter"], requester=data["requester"],
            prompt_tokens=data["prompt_tokens"], completion_tokens=data["completion_tokens"],
            tokens=tuple(TokenAttribution.from_dict(token) for token in data["tokens"]), method=data["method"],
            choice_tokens=tuple(data.get("choice_tokens", ())), recovered=bool(data.get("recovered", False)),
        )


def _is_share(value: object) -> bool:
    """A finite number >= 0 (not a bool); the float case first, it is the common one."""
    if type(value) is float:
        return 0.0 <= value < math.inf
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
