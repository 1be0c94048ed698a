"""The fee rule, one definition for both sides: a replica's worst-case hold and the journal's charge."""

from __future__ import annotations


def fee_for(price_per_1k_tokens: int, tokens: int) -> int:
    """The fee for `tokens` at a price per 1000 tokens, rounded down (never over-charged)."""
    if price_per_1k_tokens < 0 or tokens < 0:
        raise ValueError("price and tokens must be >= 0")
    return price_per_1k_tokens * tokens // 1000
