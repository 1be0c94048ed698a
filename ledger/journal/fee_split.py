"""How one inference's fee is split: exact integers, every base unit accounted for.

    fee            = price_per_1k_tokens × (prompt + completion tokens) // 1000   (rounded down)
    contributors   = fee × contributors_bps // 10000, shared by attributed weight
    adapter owner  = fee × owner_bps // 10000
    treasury       = fee − contributors' shares − owner's share        (gets every remainder)

A contributor's weight is the sum, over completion tokens, of the shares of their contributions;
the unattributed share goes, under the default "lineage_pro_rata" policy, to the adapter's lineage
(each distinct lineage contribution gets an equal part, so a contributor gets unattributed × n/N for
n of the N contributions), or to the treasury under "treasury" (also when there is no lineage).
Weights are the trace's floats taken as exact fractions; each contributor's amount is rounded down,
and the base units that rounding leaves go to the treasury. So the credits always sum to the fee
and the entry (revenue debited by the fee) sums to zero; `check_balanced` asserts it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

BPS = 10_000
FLOAT_EXPONENT_FLOOR = 1074  # every finite double is an integer multiple of 2**-1074
REVENUE_ACCOUNT = "revenue"
TREASURY_ACCOUNT = "treasury"


class AccountingError(AssertionError):
    """An entry that would break the ledger's invariants (a bug, never an input error)."""


@dataclass(frozen=True)
class FeeSplitPolicy:
    """Percentages in basis points; the treasury gets the rest (1000 = 10 % by default)."""

    contributors_bps: int = 7_000
    owner_bps: int = 2_000
    unattributed: Literal["lineage_pro_rata", "treasury"] = "lineage_pro_rata"

    def __post_init__(self) -> None:
        for name in ("contributors_bps", "owner_bps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= BPS:
                raise ValueError(f"{name} must be an integer in [0, {BPS}], got {value!r}")
        if self.contributors_bps + self.owner_bps > BPS:
            raise ValueError(f"contributors_bps + owner_bps must be <= {BPS} (the treasury gets the rest)")

    @property
    def treasury_bps(self) -> int:
        return BPS - self.contributors_bps - self.owner_bps


@dataclass(frozen=True)
class Share:
    """One line of an entry: `amount` (signed base units) on `account`, and why."""

    account: str
    role: Literal["payer", "contributor", "adapter_owner", "treasury"]
    amount: int


def exact_float_sum(values: Iterable[float]) -> Fraction:
    """The exact sum of doubles (no rounding), with integer arithmetic on a common 2**-1074 grid."""
    return Fraction(sum(map(float_units, values)), 1 << FLOAT_EXPONENT_FLOOR)


@functools.lru_cache(maxsize=4096)  # traces repeat a few weights many times
def float_units(value: float) -> int:
    """A double as an exact integer number of 2**-1074 units (every finite double is one)."""
    numerator, denominator = float(value).as_integer_ratio()  # denominator is a power of two
    return numerator << (FLOAT_EXPONENT_FLOOR + 1 - denominator.bit_length())


def payable_account(address: str) -> str:
    return f"payable:{address}"


def split_fee(policy: FeeSplitPolicy, fee: int, *, owner: str | None, attributed: Mapping[str, Fraction],
              unattributed: Fraction, lineage_counts: Mapping[str, int], payer: str = REVENUE_ACCOUNT) -> list[Share]:
    """The balanced entry for one fee: `payer` debited (the requester's account, or `revenue` for an
    inference without one), contributors/owner/treasury credited.

    `attributed` maps contributor address → summed token weight; `unattributed` is the summed
    unattributed weight; `lineage_counts` maps address → distinct lineage contributions. Zero
    amounts are left out. Addresses are taken as given (checksum them before).
    """
    if any(weight < 0 for weight in attributed.values()) or unattributed < 0:
        raise ValueError("weights must be >= 0")
    common = math.lcm(*(f.denominator for f in (*attributed.values(), unattributed)))
    return split_fee_scaled(policy, fee, owner=owner,
                            attributed={a: w.numerator * (common // w.denominator) for a, w in attributed.items()},
                            unattributed=unattributed.numerator * (common // unattributed.denominator),
                            lineage_counts=lineage_counts, payer=payer)


def split_fee_scaled(policy: FeeSplitPolicy, fee: int, *, owner: str | None, attributed: Mapping[str, int],
                     unattributed: int, lineage_counts: Mapping[str, int], payer: str = REVENUE_ACCOUNT) -> list[Share]:
    """`split_fee` with the weights as integers on one common scale (e.g. units of 2**-1074, see
    `exact_float_sum`): only their ratios count, so any common scale gives the same amounts."""
    if fee < 0:
        raise ValueError("fee must be >= 0")
    if any(weight < 0 for weight in attributed.values()) or unattributed < 0:
        raise ValueError("weights must be >= 0")
    pool = fee * policy.contributors_bps // BPS
    owner_amount = fee * policy.owner_bps // BPS if owner is not None else 0
    weights, total = _contributor_weights(policy, attributed, unattributed, lineage_counts)
    contributor_amounts: dict[str, int] = {}
    if total > 0:
        for address in sorted(weights):
            amount = pool * weights[address] // total  # integers: rounded down, exact
            if amount:
                contributor_amounts[address] = amount
    treasury = fee - sum(contributor_amounts.values()) - owner_amount
    shares = [Share(payer, "payer", -fee)] if fee else []
    shares += [Share(payable_account(a), "contributor", amount) for a, amount in contributor_amounts.items()]
    if owner_amount:
        shares.append(Share(payable_account(owner), "adapter_owner", owner_amount))  # type: ignore[arg-type]
    if treasury:
        shares.append(Share(TREASURY_ACCOUNT, "treasury", treasury))
    check_balanced(shares, fee)
    return shares


def check_balanced(shares: list[Share], fee: int) -> None:
    """Raise AccountingError unless the entry sums to zero, credits are >= 0 and sum to the fee."""
    credits = [share.amount for share in shares if share.role != "payer"]
    if sum(share.amount for share in shares) != 0:
        raise AccountingError(f"entry does not sum to zero: {shares}")
    if any(amount < 0 for amount in credits) or sum(credits) != fee:
        raise AccountingError(f"credits {credits} do not split the fee {fee}")


def _contributor_weights(policy: FeeSplitPolicy, attributed: Mapping[str, int], rest: int,
                         lineage_counts: Mapping[str, int]) -> tuple[dict[str, int], int]:
    """Integer weights per address and their denominator: a contributor's share of the pool is w / total."""
    weights = {a: w for a, w in attributed.items() if w > 0}
    total = sum(weights.values()) + rest
    lineage_total = sum(count for count in lineage_counts.values() if count > 0)
    if policy.unattributed == "lineage_pro_rata" and lineage_total and rest > 0:
        # contributor c gets (A_c + U * n_c / N) / T  ==  (A_c * N + U * n_c) / (T * N)
        weights = {a: w * lineage_total for a, w in weights.items()}
        for address, count in lineage_counts.items():
            if count > 0:
                weights[address] = weights.get(address, 0) + rest * count
        total *= lineage_total
    return weights, total
