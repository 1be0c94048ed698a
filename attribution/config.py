"""Operator settings of attribution, read from ``GATEWAY_ATTRIBUTION_*`` environment variables.

How many worker processes attribute (each one core: attribution/search_pool.py) and the lag policy's
bounds (attribution/service.py): at most `queue_max` responses held in memory, and a response waiting
longer than `max_lag_seconds` is billed unattributed. `influence` turns gradient influence off: adapters
recorded as "verbatim+influence-v1" are then attributed verbatim only. Whether attribution runs at all is
``GATEWAY_ATTRIBUTION`` (`serving.config.ServingConfig.attribution`).
"""

from __future__ import annotations

import math

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

WORKERS = 1  # one core: the engine keeps the rest
QUEUE_MAX = 1024
MAX_LAG_SECONDS = 120.0


class AttributionConfig(BaseSettings):
    """Attribution workers, the lag policy's bounds and influence (defaults: 1 worker, 1,024 responses, 120 s, on)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_ATTRIBUTION_", extra="forbid")

    workers: int = Field(WORKERS, description="Attribution worker processes (>= 1; each uses up to one core).")
    queue_max: int = Field(QUEUE_MAX, description="Responses held in memory for attribution (>= 1); past it "
                           "their usage records wait in the usage log.")
    max_lag_seconds: float = Field(MAX_LAG_SECONDS, description="A response waiting longer than this (> 0) for "
                                   "attribution is billed with every token unattributed (shed).")
    influence: bool = Field(True, description="Attribute adapters recorded as verbatim+influence-v1 with gradient "
                            "influence too (false: verbatim spans only).")

    @field_validator("workers", "queue_max")
    @classmethod
    def _at_least_one(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"GATEWAY_ATTRIBUTION_{(info.field_name or '').upper()} must be >= 1, got {value}")
        return value

    @field_validator("max_lag_seconds")
    @classmethod
    def _positive_lag(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"GATEWAY_ATTRIBUTION_MAX_LAG_SECONDS must be a finite number of seconds > 0, got {value}")
        return value
