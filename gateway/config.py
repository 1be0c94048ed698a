"""Settings of the whole node, read from ``GATEWAY_*`` environment variables: what the Serve application
needs (`serving.config.ServingConfig`) and what only the CLI and the supervisor of `gateway up` read.

Every field has a safe default so that ``make up`` runs with no configuration at all.
"""

from __future__ import annotations

import os

from pydantic import Field, PositiveInt
from pydantic_settings import SettingsConfigDict

from serving.config import PRETRAINED_MODEL, ServingConfig


class GatewayConfig(ServingConfig):
    """Top-level settings: where state lives, where each front door listens, what `gateway up` starts."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus scrape port of the supervisor (trace "
                              "shipping); a free port when taken or 0. Engine replicas serve theirs on free ports. "
                              "Every endpoint is announced in <state>/monitoring/targets/.")
    ray_num_cpus: PositiveInt = Field(4, description="Logical CPUs Ray may schedule on this node.")
    ray_dashboard: bool = Field(
        False, description="Run Ray's dashboard (web UI, job and state APIs, `serve deploy`) on 127.0.0.1:8265. "
                           "Off, Ray's API server and autoscaler monitor are stopped after start and its task "
                           "events are not recorded (~0.01 core less while idle)."
    )
    ray_address: str = Field(
        "", description="A running Ray cluster for `gateway up` to join (host:port of its head; RAY_ADDRESS is "
                        "read too) instead of starting its own node-local one. Engine replicas then take their "
                        "state directory from their own node's GATEWAY_STATE_DIR (docs/deployment.md).")
    stream_worker_logs: bool = Field(
        False, description="Stream replica/engine logs to this console (costs ~0.01 core while idle)."
    )
    index_store: str = Field(
        "", description="Where `gateway datanet publish` puts attribution indexes: a directory or an fsspec URL "
                        "(s3://bucket/indexes), as <store>/<datanet id>/v<n>; nodes copy them and check their "
                        "digest. Default: <state_dir>/indexes, on this node's disk only.")
    demo_adapters: int = Field(60, ge=0, description="Random load-test adapters built on first start.")
    demo_datanets: bool = Field(
        True, description="On first start, create the demo datanets and train an adapter on each (a few minutes)."
    )
    demo_datanet_count: PositiveInt | None = Field(
        None, description="Only the first N demo datanets (default: all of them; each costs a few minutes of "
                          "training on the pretrained model)."
    )

    @property
    def cluster_address(self) -> str | None:
        """The Ray cluster to join (GATEWAY_RAY_ADDRESS, else RAY_ADDRESS), or None: start a node-local one."""
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None

    @property
    def embedded_pretrained(self) -> bool:
        """The embedded pretrained model is served (not the tiny one, nor a directory of the operator's)."""
        return not self.base_model_path and self.base_model == PRETRAINED_MODEL
