"""Typed configuration: defaults, environment overrides and cross-field checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config import GatewayConfig
from serving.config import PRETRAINED_MODEL, TINY_MODEL, EngineConfig, ReplicaConfig


def test_defaults_are_the_documented_ports_and_state_dir() -> None:
    config = GatewayConfig()
    assert (config.host, config.http_port, config.grpc_port) == ("127.0.0.1", 8000, 9000)
    assert str(config.state_dir) == ".gateway"
    assert config.store_url.endswith(".gateway/adapters")


def test_the_pretrained_model_is_the_default_and_the_tiny_one_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_BASE_MODEL")  # the test session asks for the tiny model (tests/conftest.py)
    config = GatewayConfig()
    assert (config.base_model, config.served_model_name) == (PRETRAINED_MODEL, PRETRAINED_MODEL)
    assert config.model_path == config.state_dir / "models" / PRETRAINED_MODEL and config.embedded_pretrained
    monkeypatch.setenv("GATEWAY_BASE_MODEL", TINY_MODEL)
    tiny = GatewayConfig()
    assert (tiny.served_model_name, tiny.model_path.name, tiny.embedded_pretrained) == (TINY_MODEL, TINY_MODEL, False)
    own = GatewayConfig(base_model_path="/models/mine", served_model_name="mine")
    assert (own.model_path.as_posix(), own.served_model_name, own.embedded_pretrained) == ("/models/mine", "mine", False)
    with pytest.raises(ValidationError, match="smollm2-135m-instruct"):
        GatewayConfig(base_model="gpt-5")


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "8123")
    monkeypatch.setenv("GATEWAY_ENGINE_MAX_LORAS", "2")
    monkeypatch.setenv("GATEWAY_REPLICA_NUM_GPUS", "0.25")
    assert GatewayConfig().http_port == 8123
    assert EngineConfig().max_loras == 2
    assert ReplicaConfig().num_gpus == 0.25


def test_cpu_loras_must_hold_active_loras() -> None:
    with pytest.raises(ValidationError, match="max_cpu_loras must be >= max_loras"):
        EngineConfig(max_loras=8, max_cpu_loras=4)


def test_replica_modes() -> None:
    assert ReplicaConfig().serves_http_in_replica
    assert not ReplicaConfig(num_replicas=2).serves_http_in_replica
    scaled = ReplicaConfig(min_replicas=1, max_replicas=3)
    assert scaled.autoscaling == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 32}
    assert not scaled.serves_http_in_replica
    with pytest.raises(ValidationError, match="min_replicas must be <= max_replicas"):
        ReplicaConfig(min_replicas=4, max_replicas=2)


def test_engine_rejects_unknown_settings() -> None:
    with pytest.raises(ValidationError):
        EngineConfig(max_lora=3)


def test_ledger_fee_split_must_fit_in_100_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    from ledger.config import LedgerConfig

    monkeypatch.setenv("GATEWAY_LEDGER_CONTRIBUTORS_BPS", "9000")
    monkeypatch.setenv("GATEWAY_LEDGER_OWNER_BPS", "2000")
    with pytest.raises(ValidationError, match="must be <= 10000"):
        LedgerConfig()
    monkeypatch.setenv("GATEWAY_LEDGER_OWNER_BPS", "1000")
    assert LedgerConfig().fee_split().treasury_bps == 0
