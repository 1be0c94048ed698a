"""Starts the whole stack on one node (Ray, the Serve application), waits for it, stops it cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from gateway.config import EngineConfig, GatewayConfig, ReplicaConfig
from gateway.launcher import READY_TIMEOUT_SECONDS, wait_until_healthy

log = logging.getLogger(__name__)

# Keep the idle stack quiet (measured: loadtests/bench_serving.py prints idle CPU). Ray's own
# metrics are off: the gateway exports its metrics itself. Every value can be overridden by env.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_metrics_report_interval_ms": "60000",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "2",
    "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60",
    "RAY_SERVE_REPLICA_UTILIZATION_REPORT_INTERVAL_S": "60",
    "RAY_SERVE_REPLICA_MAX_PROCESSING_LATENCY_REPORT_INTERVAL_S": "60",
    "RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S": "60",
    "AUTOSCALER_UPDATE_INTERVAL_S": "30",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


class StopRequested(Exception):
    """Ctrl-C/SIGTERM arrived while the stack was still starting."""


def ensure_demo_assets(config: GatewayConfig) -> None:
    """Build the demo model and adapters on first start (skipped when a model path is configured)."""
    from training.demo_assets import ensure_base_model, ensure_demo_adapters

    if config.base_model_path:
        return
    print(f"[gateway] demo assets in {config.state_dir} (built once, then cached)", flush=True)
    model_dir = ensure_base_model(config.model_path)
    if "://" not in config.store_url:
        ensure_demo_adapters(model_dir, Path(config.store_url), config.demo_adapters)


def run(config: GatewayConfig, engine: EngineConfig, replica: ReplicaConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut Serve, Ray and the local chain down."""
    from gateway.demo_data import ensure_demo_datanets
    from gateway.ledger_access import registry_contract

    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_demo_assets(config)
    with registry_contract(config) as registry:
        print(f"[gateway] chain {registry.client.rpc_url}: DatanetRegistry at {registry.address}", flush=True)
        if config.demo_datanets and not config.base_model_path:
            ensure_demo_datanets(config, registry, lambda line: print(line, flush=True))
        _serve(config, engine, replica)


def _serve(config: GatewayConfig, engine: EngineConfig, replica: ReplicaConfig) -> None:
    """Ray and the Serve application, until a signal."""
    import ray
    from ray import serve

    from serving.deployment import build_application

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        print(f"\n[gateway] signal {signum}: shutting down", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    print("[gateway] starting Ray", flush=True)
    ray.init(
        address="local",
        num_cpus=config.ray_num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=config.stream_worker_logs,
    )
    if not config.stream_worker_logs:
        # Ray's log monitor polls every log file ten times a second (~0.01 core when idle); the
        # logs stay in Ray's session directory.
        node = ray._private.worker._global_node
        node.kill_log_monitor()
        print(f"[gateway] replica and engine logs: {node.get_logs_dir_path()}", flush=True)
    try:
        direct = replica.serves_http_in_replica
        serve.start(
            http_options={
                "host": config.host,
                "port": config.http_port,
                "location": "NoServer" if direct else "HeadOnly",
            },
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        print("[gateway] deploying the engine (first start builds the vLLM engine, ~30 s)", flush=True)
        serve.run(build_application(config, engine, replica), name="gateway", route_prefix="/", blocking=False)
        base = f"http://{config.host}:{config.http_port}"

        def not_stopped() -> None:
            if stop.is_set():
                raise StopRequested

        try:
            wait_until_healthy(f"{base}/health", READY_TIMEOUT_SECONDS, not_stopped)
        except StopRequested:
            return
        print(f"[gateway] ready: OpenAI API at {base}/v1, gRPC at {config.host}:{config.grpc_port}"
              f" (model '{config.served_model_name}' and adapters from {config.store_url}); Ctrl-C stops",
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("[gateway] stopping Serve and Ray", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print("[gateway] stopped", flush=True)
