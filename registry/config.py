"""Typed settings of the datanet registry (``GATEWAY_DATANET_``)."""

from __future__ import annotations

from pydantic import Field, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatanetConfig(BaseSettings):
    """Limits that keep contributions honest; every field can be set by env."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_DATANET_")

    max_contribution_bytes: PositiveInt = Field(
        64 * 1024, description="Largest contribution (UTF-8 bytes after normalization)."
    )
    max_bytes_per_contributor_per_day: PositiveInt = Field(
        16 * 1024 * 1024, description="Bytes one contributor may add per UTC day, over all datanets."
    )
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="Word-3-gram Jaccard similarity at or above which a text is a near-duplicate."
    )
    default_license: str = Field("CC-BY-4.0", description="License recorded when the contributor names none.")
