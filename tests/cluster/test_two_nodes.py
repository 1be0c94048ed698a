"""The gateway on a two-node Ray cluster whose nodes share no disk, driven as an operator and a client would.

Two Ray nodes run as separate `ray start` processes, each with its own resources, environment and
state directory: the head (`front`: Serve's controller, proxy and `gateway up`'s supervisor) and an
engine node, the only one offering the `gateway-engine` resource the engine replica asks for. All
they share is the store URL (a real S3 endpoint on loopback: moto's server, reached by s3fs), the
ledger's PostgreSQL and the chain. `gateway up --ray-address` joins the cluster.

The whole loop runs through the engine node: contribute → publish (the index goes to S3, its digest
to the ledger) → train (the adapter goes to S3) → serve from the engine node (adapter and index
fetched into its own cache and checked) → attribute → its node's outbox, shipped by its own replica →
ledger → settle on-chain. Then the engine node's raylet is SIGKILLed under load and the node brought
back: every response a client received completely is billed exactly once, and Serve reschedules
the replica there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest

from registry.contribution_content import address_of_key
from gateway.ledger_process import LedgerProcess
from statedir.layout import StateLayout
from storage.database import open_database
from tests.support.client_load import Load, reconcile
from tests.support.launcher import GatewayProcess
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer
from tests.support.ray_nodes import RayNode, wait_for_nodes
from tests.support.s3 import S3Server

pytestmark = pytest.mark.stack

TINY_MODEL = "datanet-tiny-llama"
ENGINE_RESOURCE = "gateway-engine"
DATANET = "harbour-notes"
ADAPTER = "harbour-guide"
PRICE = 10**15
PASSAGES = [
    "The harbour master rings the brass bell twice at dawn when the fishing fleet returns with a full hold, "
    "and the gulls gather above the old stone quay long before the first boat ties up.",
    "Every autumn the lock keepers drain the inner basin, scrape the green weed from its granite walls, and "
    "count the iron rings that the whaling ships once used to moor beside the rope walk.",
]
PROMPT_WORDS = 12
CONTRIBUTOR_KEY = "0x" + "5e" * 32
OWNER_KEY = "0x" + "6f" * 32
RECONCILE_SECONDS = 240.0


@dataclass
class Cluster:
    front: RayNode
    engine_node: RayNode
    gateway: GatewayProcess
    ledger: LedgerProcess
    database_url: str
    cli_env: dict[str, str]
    front_state: Path
    engine_state: Path

    def cli(self, *args: str) -> dict:
        """`gateway … --json` as an operator runs it on the head node; its JSON answer."""
        done = subprocess.run([str(Path(sys.executable).with_name("gateway")), *args, "--json"],
                              env={**os.environ, **self.cli_env}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"gateway {' '.join(args)}: {done.stderr[-3000:]}"
        return json.loads(done.stdout)

    def restart_engine_node(self) -> None:
        self.engine_node.stop()
        self.engine_node.process = None
        self.engine_node.start()


def provision_node(state: Path, model_source: Path, token: Path) -> None:
    """What an image or a node's provisioning puts on a node's own disk: the base model, the ledger token."""
    shutil.copytree(model_source, StateLayout(state).model(TINY_MODEL))
    shutil.copy(token, state / "ledger-token-secret")
    (state / "ledger-token-secret").chmod(0o600)


@pytest.fixture(scope="module")
def cluster(demo_state: Path, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    front_state, engine_state = root / "front-state", root / "engine-state"
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    ray_token, ledger_token = secrets / "ray-token", secrets / "ledger-token"
    ray_token.write_text(os.urandom(32).hex())
    ledger_token.write_text(os.urandom(32).hex())
    for path in (ray_token, ledger_token):
        path.chmod(0o600)
    for state in (front_state, engine_state):
        state.mkdir()
        provision_node(state, StateLayout(demo_state).model(TINY_MODEL), ledger_token)

    s3 = S3Server().start()
    database_url = postgres.create_database("cluster")
    ledger_port, chain_port = free_port(), free_port()
    shared = {  # what every node is told: the store, the ledger, the cluster's token; nothing else
        **s3.env,
        "GATEWAY_BASE_MODEL": TINY_MODEL,
        "GATEWAY_ADAPTER_STORE": s3.url("adapters"),
        "GATEWAY_INDEX_STORE": s3.url("indexes"),
        "GATEWAY_LEDGER_ADDRESS": f"127.0.0.1:{ledger_port}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(ray_token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_worker_niceness": "0",
        "GLOO_SOCKET_IFNAME": "lo",
        "GATEWAY_ENGINE_MAX_LORAS": "2",
        "GATEWAY_ENGINE_MAX_CPU_LORAS": "4",
    }

    def node_env(state: Path) -> dict[str, str]:
        return {**shared, "GATEWAY_STATE_DIR": str(state),
                "GATEWAY_LEDGER_TOKEN_FILE": str(state / "ledger-token-secret")}

    front = RayNode("127.0.0.2", 2, {"gateway-front": 1}, node_env(front_state), root / "front-node.log").start()
    engine_node = RayNode("127.0.0.3", 2, {ENGINE_RESOURCE: 1}, node_env(engine_state), root / "engine-node.log",
                          head_address=front.address)
    ledger = gateway = None
    try:
        wait_for_nodes(front, 1)
        engine_node.start()
        wait_for_nodes(front, 2)
        ledger_env = {**node_env(front_state), "DATABASE_URL": database_url, "GATEWAY_CHAIN_PORT": str(chain_port)}
        ledger_env.pop("GATEWAY_LEDGER_ADDRESS")
        ledger = LedgerProcess(front_state, "127.0.0.1", ledger_port, env=ledger_env,
                               log_file=root / "ledger.log").start()
        front_env = {
            **node_env(front_state), "DATABASE_URL": database_url, "GATEWAY_CHAIN_PORT": str(chain_port),
            "GATEWAY_DEMO_DATANETS": "false", "GATEWAY_DEMO_ADAPTERS": "0",
            # the Ingress shape (Serve's proxy on the head) with one engine replica, placed on the engine node
            "GATEWAY_REPLICA_MIN_REPLICAS": "1", "GATEWAY_REPLICA_MAX_REPLICAS": "1",
            "GATEWAY_REPLICA_RESOURCES": json.dumps({ENGINE_RESOURCE: 1}),
            "GATEWAY_SETTLE_PERIODIC": "false", "GATEWAY_DEPOSITS_WATCH": "false",
        }
        gateway = GatewayProcess(front_state, free_port(), free_port(), env=front_env,
                                 extra_args=("--ray-address", front.address)).start()
        cli_env = {**front_env, "GATEWAY_LEDGER_PORT": str(ledger_port)}
        yield Cluster(front, engine_node, gateway, ledger, database_url, cli_env, front_state, engine_state)
    finally:
        if gateway is not None:
            assert gateway.stop() == 0, "gateway up left the cluster cleanly"
        engine_node.stop()
        front.stop()
        if ledger is not None:
            ledger.stop()
        s3.stop()


def engine_replicas(node: RayNode) -> list[psutil.Process]:
    return [p for p in node.processes() if p.name().startswith("ray::ServeReplica:gateway:engine")]


def test_the_whole_loop_runs_through_the_engine_node(cluster: Cluster, tmp_path: Path) -> None:
    assert engine_replicas(cluster.engine_node), "the engine replica runs on the engine node"
    assert not engine_replicas(cluster.front), "and not on the head"
    contributor = address_of_key(CONTRIBUTOR_KEY)
    key = tmp_path / "contributor.key"
    key.write_text(CONTRIBUTOR_KEY)
    files = []
    for i, text in enumerate(PASSAGES):
        files.append(tmp_path / f"passage-{i}.txt")
        files[-1].write_text(text)
    cluster.cli("datanet", "create", DATANET, "--description", "harbours and locks")
    added = cluster.cli("datanet", "contribute", DATANET, *map(str, files), "--key-file", str(key))
    assert len(added["contributions"]) == len(PASSAGES)
    published = cluster.cli("datanet", "publish", DATANET)
    assert published["index_path"].startswith("s3://") and published["index_digest"].startswith("sha256:")
    trained = cluster.cli("adapter", "train", ADAPTER, "--datanet", DATANET, "--owner", address_of_key(OWNER_KEY),
                          "--price-per-1k-tokens", str(PRICE))
    assert trained["uri"].startswith("s3://")

    client = openai.OpenAI(base_url=f"{cluster.gateway.base_url}/v1", api_key=cluster.gateway.api_key,
                           max_retries=0, timeout=120)
    deadline = time.monotonic() + 30
    while ADAPTER not in {m.id for m in client.models.list().data}:
        assert time.monotonic() < deadline, "the new adapter never appeared in /v1/models"
        time.sleep(1)
    words = PASSAGES[0].split()
    raw = client.completions.with_raw_response.create(model=ADAPTER, prompt=" ".join(words[:PROMPT_WORDS]),
                                                      max_tokens=40, temperature=0, extra_body={"attribution": True})
    assert raw.headers["x-gateway-replica"], "an engine replica answered through the head's proxy"
    body = json.loads(raw.text)
    attribution = body["attribution"]
    assert attribution["contributors"][0]["address"] == contributor, attribution
    trace_id = raw.headers["x-attribution-trace-id"]

    engine_layout, front_layout = StateLayout(cluster.engine_state), StateLayout(cluster.front_state)
    assert (engine_layout.traces / f"{trace_id}.pb").exists(), "the engine node keeps its copy of the trace"
    assert not front_layout.traces.exists() or not list(front_layout.traces.iterdir()), "the head served nothing"
    digest_hex = published["index_digest"].removeprefix("sha256:")
    assert (engine_layout.index_cache / digest_hex).is_dir(), "the index came from the store into the node's cache"
    assert not (cluster.engine_state / "indexes").exists(), "nothing was built or read from the head's disk"

    stored = wait_for_trace(cluster, trace_id)  # shipped by the engine node's own replica
    assert stored["trace"]["adapter"] == ADAPTER and int(stored["fee"]) > 0
    owed = int(cluster.cli("ledger", "balance", contributor)["payable"])
    assert owed > 0
    result = cluster.cli("settle", "--threshold", "1")
    assert result["batches"] and {b["state"] for b in result["batches"]} == {"paid"}
    balance = cluster.cli("ledger", "balance", contributor)
    assert balance["payable"] == "0" and int(balance["paid"]) >= owed, "the contributor was paid on-chain"


def wait_for_trace(cluster: Cluster, trace_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([str(Path(sys.executable).with_name("gateway")), "ledger", "trace", trace_id, "--json"],
                              env={**os.environ, **cluster.cli_env}, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return json.loads(done.stdout)
        assert time.monotonic() < deadline, f"trace {trace_id} never reached the ledger: {done.stderr[-1000:]}"
        time.sleep(1)


def kill_left_behind(processes: list[psutil.Process], grace: float = 30.0) -> None:
    """The lost node's processes that outlived it (an engine process whose parent died): a machine that
    goes down takes them along, so the test does too."""
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_engine_node_lost_under_load_bills_every_received_response_once(cluster: Cluster) -> None:
    with Load(cluster.gateway, ADAPTER) as load:
        load.wait_for(6)
        [replica] = engine_replicas(cluster.engine_node)
        raylet, node_processes = cluster.engine_node.raylet(), cluster.engine_node.processes()
        raylet.send_signal(signal.SIGKILL)
        psutil.wait_procs([raylet], timeout=30)
        psutil.wait_procs([replica], timeout=60)
        assert not replica.is_running(), "the node's workers died with its raylet"
        kill_left_behind(node_processes)
        before = load.count()
        cluster.restart_engine_node()
        wait_for_nodes(cluster.front, 2)
        load.wait_for(6)  # Serve rescheduled the replica on the engine node, which serves again
        [again] = engine_replicas(cluster.engine_node)
        assert again.pid != replica.pid and load.count() >= before + 6
    received = load.received
    engine = open_database(cluster.database_url)
    try:
        records = reconcile(engine, received, RECONCILE_SECONDS)
    finally:
        engine.dispose()
    assert all(record.fee > 0 for record in records)
    print(f"{len(received)} responses received completely ({load.failures} failed while the engine node was "
          f"down); each billed once")
