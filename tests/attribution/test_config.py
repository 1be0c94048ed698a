"""Attribution's operator settings: defaults, GATEWAY_ATTRIBUTION_* overrides, bad values refused, and
the service built with them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from attribution.config import AttributionConfig
from attribution.index_builder import IndexManifest
from attribution.service import AttributionService, LedgerLineages
from ledger.client.access import LineageRecord


class OneLineage:
    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir

    def lineage(self, adapter: str) -> LineageRecord:
        return LineageRecord(index_dirs=(str(self.index_dir),))


@pytest.fixture(autouse=True)
def _no_attribution_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORKERS", "QUEUE_MAX", "MAX_LAG_SECONDS", "INFLUENCE"):
        monkeypatch.delenv(f"GATEWAY_ATTRIBUTION_{name}", raising=False)


def test_defaults_are_one_worker_1024_responses_and_120_seconds() -> None:
    config = AttributionConfig()
    assert (config.workers, config.queue_max, config.max_lag_seconds) == (1, 1024, 120.0)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_WORKERS", "2")
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_QUEUE_MAX", "64")
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_MAX_LAG_SECONDS", "7.5")
    monkeypatch.setenv("GATEWAY_ATTRIBUTION", "true")  # the on/off switch (ServingConfig) is not one of these
    config = AttributionConfig()
    assert (config.workers, config.queue_max, config.max_lag_seconds) == (2, 64, 7.5)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("WORKERS", "0", "GATEWAY_ATTRIBUTION_WORKERS must be >= 1, got 0"),
    ("QUEUE_MAX", "-3", "GATEWAY_ATTRIBUTION_QUEUE_MAX must be >= 1, got -3"),
    ("MAX_LAG_SECONDS", "0", "GATEWAY_ATTRIBUTION_MAX_LAG_SECONDS must be a finite number of seconds > 0, got 0.0"),
    ("MAX_LAG_SECONDS", "-1", "must be a finite number of seconds > 0, got -1.0"),
    ("MAX_LAG_SECONDS", "inf", "must be a finite number of seconds > 0, got inf"),
    ("WORKERS", "two", "valid integer"),
])
def test_bad_values_are_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                    message: str) -> None:
    monkeypatch.setenv(f"GATEWAY_ATTRIBUTION_{name}", value)
    with pytest.raises(ValidationError, match=message) as refused:
        AttributionConfig()
    assert [error["loc"] for error in refused.value.errors()] == [(name.lower(),)]


def test_influence_is_on_unless_turned_off(built: tuple[Path, IndexManifest], monkeypatch: pytest.MonkeyPatch) -> None:
    assert AttributionConfig().influence is True
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_INFLUENCE", "false")
    assert AttributionConfig().influence is False
    service = AttributionService.from_config(LedgerLineages(OneLineage(built[0])), processes=False)
    try:
        assert service.influence is False
    finally:
        service.close()
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_INFLUENCE", "sometimes")
    with pytest.raises(ValidationError, match="valid boolean"):
        AttributionConfig()


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="worker"):
        AttributionConfig(worker=2)  # type: ignore[call-arg]


def test_the_service_takes_the_settings(built: tuple[Path, IndexManifest], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_WORKERS", "2")
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_QUEUE_MAX", "3")
    monkeypatch.setenv("GATEWAY_ATTRIBUTION_MAX_LAG_SECONDS", "9")
    service = AttributionService.from_config(LedgerLineages(OneLineage(built[0])), processes=False)
    try:
        assert (service.workers, service.queue_max, service.max_lag_seconds) == (2, 3, 9.0)
    finally:
        service.close()
    for name in ("WORKERS", "QUEUE_MAX", "MAX_LAG_SECONDS"):
        monkeypatch.delenv(f"GATEWAY_ATTRIBUTION_{name}")
    given = AttributionService.from_config(LedgerLineages(OneLineage(built[0])), AttributionConfig(queue_max=5),
                                           processes=False)
    try:
        assert (given.workers, given.queue_max, given.max_lag_seconds) == (1, 5, 120.0)
    finally:
        given.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers": 0}, "workers must be >= 1, got 0"),
    ({"queue_max": 0}, "queue_max must be >= 1, got 0"),
    ({"max_lag_seconds": 0.0}, "max_lag_seconds must be a finite number > 0, got 0.0"),
    ({"max_lag_seconds": float("nan")}, "max_lag_seconds must be a finite number > 0, got nan"),
])
def test_the_service_refuses_bad_bounds(built: tuple[Path, IndexManifest], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttributionService(LedgerLineages(OneLineage(built[0])), processes=False, **kwargs)
