"""Cluster benchmark: the gateway on two Ray nodes against one node, same workload, one script run.

Two setups run one after the other, each on a fresh Ray cluster of separate `ray start` processes
(tests/support/ray_nodes.py; nodes on 127.0.0.2 and 127.0.0.3, token auth, every node its own state
directory with the tiny model provisioned and its own copy of the ledger token):

* one-node:  the head offers `{"gateway-engine": 1}`; `gateway up --ray-address` runs one engine replica
             (GATEWAY_REPLICA_MIN_REPLICAS = MAX = 1) behind Serve's proxy;
* two-nodes: the head and a second node each offer `{"gateway-engine": 1}`; two replicas (min = max = 2),
             so one lands on each node, behind the head's proxy with Serve's adapter-affinity routing
             (multiplexed model ids).

Shared by both: a moto S3 server on loopback holding `--adapters` (default 20) demo adapters
(GATEWAY_ADAPTER_STORE=s3://...: each node downloads what it serves into its own cache) and one
ledger service (SQLite in the head's state directory). Both setups go through Serve's proxy (a
replica serves HTTP itself only with a single fixed replica, which autoscaling bounds rule out).

Workload per setup: first a warm-up, not measured: each adapter once (loads it from the store), then
`--warmup` (default 64) Zipf requests at full concurrency (another seed). Then `--requests` (default
192) streamed completions of 64 tokens (ignore_eos, temperature 0), `--concurrency` (default 32) in
flight, each on one of the adapters picked with Zipf(1) popularity from a seeded sequence (the same
sequence for both setups). Warm-up and measurement start once Serve reports every replica RUNNING.
Per setup: output tokens/s over the wall time, request latency p50/p95 (send to last chunk), TTFT
p50, errors, and the ratio two-nodes / one-node. Adapter affinity (from each response's
`x-gateway-replica` header): the share of requests served by their adapter's most frequent replica
(1.0 = perfect affinity) and the number of adapters each replica served.

By default node i is pinned to core i (its processes inherit the affinity; vLLM binds its threads
within it), so each node stands for a one-core machine and two nodes have twice the cores of one,
as scaling out to a second machine would. The rest (client, ledger, S3, `gateway up`) is not
pinned and competes with both. With `--no-pin` every node uses every core: then both engines bind
the same core (vLLM's automatic binding picks the same one in each process) and the figure measures
that contention, not scale-out.

Run from the repository root, under the machine's exclusive lock (the demo model and adapters are
built once into `<work-dir>/assets` and reused; each run's logs go to `<work-dir>/run-<time>/`):

    flock -x /tmp/quiet.lock .venv/bin/python loadtests/bench_cluster.py --work-dir /tmp/bench-cluster \
        [--requests 192] [--concurrency 32] [--json out.json]

Every process it starts is stopped on exit, error or Ctrl-C; `ray stop` is never run (it would stop
every Ray cluster of the user).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.config import GatewayConfig  # noqa: E402
from gateway.ledger_process import LedgerProcess  # noqa: E402
from gateway.supervisor import ensure_demo_assets  # noqa: E402
from loadtests.bench_serving import MAX_TOKENS, _sigterm, log, pct, run_requests, workload  # noqa: E402
from serving.adapter_store import AdapterStore  # noqa: E402
from serving.deployment import REPLICA_HEADER  # noqa: E402
from statedir.layout import StateLayout  # noqa: E402
from tests.support.launcher import GatewayProcess  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.ray_nodes import RayNode, wait_for_nodes  # noqa: E402
from tests.support.s3 import S3Server, clear_fsspec_instances  # noqa: E402
from training.demo_assets import demo_adapter_name  # noqa: E402

TINY_MODEL = "datanet-tiny-llama"
ENGINE_RESOURCE = "gateway-engine"
ENGINE_REPLICA_PROCESS = "ray::ServeReplica:gateway:engine"
NODE_IPS = ("127.0.0.2", "127.0.0.3")
NODE_CPUS = 2
REPLICAS_READY_SECONDS = 180.0


# ---- assets, store, tokens, ledger: set up once --------------------------------------------------
def ensure_assets(assets: Path, count: int) -> None:
    """The tiny model and the demo adapters, built once into `assets` (skipped when present)."""
    layout = StateLayout(assets)
    if layout.model(TINY_MODEL).is_dir() and (layout.adapters / demo_adapter_name(count - 1)).is_dir():
        log(f"reusing the model and demo adapters in {assets}")
        return
    log(f"building the tiny model and demo adapters into {assets} (once; a few minutes)")
    os.environ["GATEWAY_BASE_MODEL"] = TINY_MODEL
    os.environ.pop("GATEWAY_ADAPTER_STORE", None)
    ensure_demo_assets(GatewayConfig(state_dir=assets, demo_adapters=max(count, 60)))


def secret_file(path: Path) -> Path:
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)
    return path


def provision_node(state: Path, assets: Path, ledger_token: Path) -> None:
    """What a node's own disk holds before it joins: the base model and the ledger token."""
    state.mkdir(parents=True)
    shutil.copytree(StateLayout(assets).model(TINY_MODEL), StateLayout(state).model(TINY_MODEL))
    shutil.copy(ledger_token, state / "ledger-token-secret")
    (state / "ledger-token-secret").chmod(0o600)


def upload_adapters(s3: S3Server, assets: Path, names: list[str], cache: Path) -> str:
    """Put the adapters into the S3 store (this process talks to moto through the AWS_* variables)."""
    os.environ.update(s3.env)
    clear_fsspec_instances()
    url = s3.url("adapters")
    store = AdapterStore(url, cache)
    for name in names:
        store.put(name, StateLayout(assets).adapters / name)
    log(f"uploaded {len(names)} adapters to {url}")
    return url


@dataclass
class Shared:
    """What every setup uses: the run directory, the nodes' state directories and settings."""

    run_dir: Path
    states: tuple[Path, Path]  # head, second node
    env: dict[str, str]  # told to every node and to `gateway up`
    chain_port: int

    def node_env(self, state: Path) -> dict[str, str]:
        return {**self.env, "GATEWAY_STATE_DIR": str(state),
                "GATEWAY_LEDGER_TOKEN_FILE": str(state / "ledger-token-secret")}


def shared_setup(stack: ExitStack, work_dir: Path, adapters: list[str]) -> Shared:
    assets = work_dir / "assets"
    ensure_assets(assets, len(adapters))
    run_dir = work_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    secrets = run_dir / "secrets"
    secrets.mkdir(parents=True, mode=0o700)
    ray_token, ledger_token = secret_file(secrets / "ray-token"), secret_file(secrets / "ledger-token")
    states = (run_dir / "head-state", run_dir / "node2-state")
    for state in states:
        provision_node(state, assets, ledger_token)
    log("starting the S3 server (moto)")
    s3 = S3Server().start()
    stack.callback(s3.stop)
    store_url = upload_adapters(s3, assets, adapters, run_dir / "upload-cache")
    ledger_port = free_port()
    env = {
        **s3.env, "GATEWAY_BASE_MODEL": TINY_MODEL, "GATEWAY_ADAPTER_STORE": store_url,
        "GATEWAY_LEDGER_ADDRESS": f"127.0.0.1:{ledger_port}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token), "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_worker_niceness": "0", "GLOO_SOCKET_IFNAME": "lo",
        "GATEWAY_SETTLE_PERIODIC": "false", "GATEWAY_DEPOSITS_WATCH": "false",
    }
    shared = Shared(run_dir, states, env, free_port())
    ledger_env = {**shared.node_env(states[0]), "GATEWAY_CHAIN_PORT": str(shared.chain_port)}
    ledger_env.pop("GATEWAY_LEDGER_ADDRESS")
    log(f"starting the ledger (SQLite in {states[0]}) on 127.0.0.1:{ledger_port}")
    ledger = LedgerProcess(states[0], "127.0.0.1", ledger_port, env=ledger_env,
                           log_file=run_dir / "ledger.log").start()
    stack.callback(ledger.stop)
    return shared


# ---- one setup: a cluster of N engine nodes, `gateway up` with N replicas -------------------------
def start_cluster(stack: ExitStack, shared: Shared, name: str, nodes: int, pin: bool) -> list[RayNode]:
    started: list[RayNode] = []
    for index in range(nodes):
        state = shared.states[index]
        cores = frozenset({index % (os.cpu_count() or 1)}) if pin else None
        node = RayNode(NODE_IPS[index], NODE_CPUS, {ENGINE_RESOURCE: 1}, shared.node_env(state),
                       shared.run_dir / f"{name}-node{index + 1}.log",
                       head_address=started[0].address if started else None, cores=cores)
        log(f"{name}: starting Ray node {index + 1} on {node.ip} ({'head' if not started else 'worker'}, "
            f"{NODE_CPUS} CPUs, {{{ENGINE_RESOURCE!r}: 1}}, "
            f"{'core ' + str(min(cores)) if cores else 'every core'})")
        node.start()
        stack.callback(node.stop)  # stopped in reverse order: workers before the head
        started.append(node)
        wait_for_nodes(started[0], len(started))
    return started


def start_gateway(stack: ExitStack, shared: Shared, name: str, head: RayNode, replicas: int) -> GatewayProcess:
    env = {
        **shared.node_env(shared.states[0]), "GATEWAY_CHAIN_PORT": str(shared.chain_port),
        "GATEWAY_DEMO_DATANETS": "false", "GATEWAY_DEMO_ADAPTERS": "0",
        "GATEWAY_REPLICA_MIN_REPLICAS": str(replicas), "GATEWAY_REPLICA_MAX_REPLICAS": str(replicas),
        "GATEWAY_REPLICA_RESOURCES": json.dumps({ENGINE_RESOURCE: 1}),
    }
    gateway = GatewayProcess(shared.states[0], free_port(), free_port(), env=env,
                             log_path=shared.run_dir / f"{name}-gateway.log",
                             extra_args=("--ray-address", head.address))
    log(f"{name}: starting `gateway up --ray-address {head.address}` with {replicas} replica(s) "
        f"(log {gateway.log_path})")

    def stop() -> None:
        code = gateway.stop()
        if code:
            log(f"{name}: gateway up exited with {code}; see {gateway.log_path}")

    stack.callback(stop)
    gateway.start()
    return gateway


def engine_replicas_per_node(nodes: list[RayNode]) -> list[int]:
    counts = []
    for node in nodes:
        names = []
        for process in node.processes():
            try:
                names.append(process.name())
            except Exception:  # noqa: BLE001 - a process that just ended
                pass
        counts.append(sum(n.startswith(ENGINE_REPLICA_PROCESS) for n in names))
    return counts


RUNNING_REPLICAS = """
import sys, time, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while True:
    app = serve.status().applications.get("gateway")
    engine = app.deployments.get("engine") if app else None
    running = engine.replica_states.get("RUNNING", 0) if engine else 0
    if running >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(1)
print(running)
"""


def wait_for_running_replicas(head: RayNode, expected: int, timeout: float = REPLICAS_READY_SECONDS) -> None:
    """Until Serve reports `expected` engine replicas RUNNING (initialized: the gateway answers /health
    as soon as one can serve, and the other may still be building its engine)."""
    done = subprocess.run([sys.executable, "-c", RUNNING_REPLICAS, head.address, str(expected), str(timeout)],
                          env={**os.environ, **head.env}, capture_output=True, text=True, timeout=timeout + 60)
    running = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "?"
    if done.returncode != 0 or running != str(expected):
        raise RuntimeError(f"{running} engine replicas running, not {expected}: {done.stderr[-2000:]}")


def wait_for_replicas(nodes: list[RayNode], timeout: float = REPLICAS_READY_SECONDS) -> list[int]:
    """Until every node runs one initialized engine replica; the counts of replica processes per node."""
    wait_for_running_replicas(nodes[0], len(nodes), timeout)
    counts = engine_replicas_per_node(nodes)
    if counts != [1] * len(nodes):
        raise RuntimeError(f"engine replicas per node {counts}, expected one on each")
    return counts


# ---- the client: a streamed completion, with the replica that served it ----------------------------
@dataclass
class Result:
    model: str
    replica: str
    latency: float  # seconds from sending to the last chunk
    ttft: float
    tokens: int


class ReplicaClient:
    """Streams `POST /v1/completions` (the body bench_serving sends) and keeps the x-gateway-replica header."""

    def __init__(self, base_url: str, concurrency: int, headers: dict[str, str]) -> None:
        self.url = f"{base_url}/v1/completions"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                             timeout=aiohttp.ClientTimeout(total=600), headers=headers)

    async def stream(self, model: str, prompt: str) -> Result:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        first: float | None = None
        tokens = chunks = 0
        start = time.perf_counter()
        async with self.session.post(self.url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
            replica = response.headers.get(REPLICA_HEADER, "?")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                if event.get("choices"):
                    chunks += 1
                    first = first if first is not None else time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        if first is None:
            raise RuntimeError("stream ended without a content chunk")
        return Result(model, replica, time.perf_counter() - start, first - start, tokens or chunks)

    async def aclose(self) -> None:
        await self.session.close()


async def drive(gateway: GatewayProcess, args: argparse.Namespace, adapters: list[str],
                models: list[str]) -> tuple[list[Result], list[str], float, list[Result]]:
    """Warm-up (each adapter once), then the measured requests; (results, errors, wall seconds, warm-up)."""
    client = ReplicaClient(gateway.base_url, args.concurrency, gateway.headers)
    try:
        warm, errors = await run_requests(client, adapters, min(args.concurrency, len(adapters)))
        more = workload("zipf", args.warmup, TINY_MODEL, adapters, args.seed - 1)  # the batch shapes of the run
        errors += (await run_requests(client, more, args.concurrency, warm))[1]
        log(f"warm-up done: requests per replica {dict(Counter(r.replica for r in warm))}, {len(errors)} errors"
            + (f" (first: {errors[0]})" if errors else ""))
        start = time.perf_counter()
        results, errors = await run_requests(client, models, args.concurrency)
        return results, errors, time.perf_counter() - start, warm
    finally:
        await client.aclose()


# ---- figures ----------------------------------------------------------------------------------------
def affinity(results: list[Result]) -> dict[str, Any]:
    """Which replicas served each adapter; the share of requests on their adapter's most frequent replica."""
    by_adapter: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        by_adapter[r.model][r.replica] += 1
    on_top = sum(c.most_common(1)[0][1] for c in by_adapter.values())
    per_replica: dict[str, set[str]] = defaultdict(set)
    for model, counts in by_adapter.items():
        for replica in counts:
            per_replica[replica].add(model)
    return {
        "share_on_top_replica": on_top / len(results) if results else float("nan"),
        "adapters_per_replica": {replica: len(models) for replica, models in sorted(per_replica.items())},
        "requests_per_replica": dict(sorted(Counter(r.replica for r in results).items())),
        "split_adapters": sorted(m for m, c in by_adapter.items() if len(c) > 1),
        "by_adapter": {m: dict(c) for m, c in sorted(by_adapter.items())},
    }


def summarize(name: str, replicas: int, results: list[Result], errors: list[str], wall: float,
              placement: list[int]) -> dict[str, Any]:
    latency = [r.latency * 1000 for r in results]
    return {
        "setup": name, "replicas": replicas, "replicas_per_node": placement, "requests": len(results),
        "errors": len(errors), "error_samples": errors[:5], "tokens": sum(r.tokens for r in results),
        "wall_s": wall, "tok_s": sum(r.tokens for r in results) / wall,
        "latency_p50_ms": pct(latency, 50), "latency_p95_ms": pct(latency, 95),
        "ttft_p50_ms": pct([r.ttft * 1000 for r in results], 50), "affinity": affinity(results),
    }


def print_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n=== gateway on Ray: {args.requests} streams x {MAX_TOKENS} tokens, {args.concurrency} in flight, "
          f"Zipf(1) over {args.adapters} adapters (seed {args.seed}), model {TINY_MODEL}, {os.cpu_count()} cores ===")
    print(f"{'setup':<11}{'replicas':>9}{'per node':>10}{'tok/s':>10}{'p50 ms':>10}{'p95 ms':>10}"
          f"{'TTFT p50':>10}{'errors':>8}")
    for row in rows:
        print(f"{row['setup']:<11}{row['replicas']:>9}{str(row['replicas_per_node']):>10}{row['tok_s']:>10.1f}"
              f"{row['latency_p50_ms']:>10.0f}{row['latency_p95_ms']:>10.0f}{row['ttft_p50_ms']:>10.0f}"
              f"{row['errors']:>8}")
    if len(rows) == 2:
        one, two = rows
        print(f"two-nodes / one-node: tokens/s {two['tok_s'] / one['tok_s']:.3f}, latency p50 "
              f"{two['latency_p50_ms'] / one['latency_p50_ms']:.3f}, "
              f"p95 {two['latency_p95_ms'] / one['latency_p95_ms']:.3f}")
    for row in rows:
        aff = row["affinity"]
        print(f"{row['setup']} affinity: {aff['share_on_top_replica']:.3f} of requests on their adapter's most "
              f"frequent replica; adapters served per replica "
              + ", ".join(f"{replica[:12]} {n}" for replica, n in aff["adapters_per_replica"].items())
              + "; requests per replica "
              + ", ".join(f"{replica[:12]} {n}" for replica, n in aff["requests_per_replica"].items())
              + f"; adapters on more than one replica: {len(aff['split_adapters'])}")


# ---- main -------------------------------------------------------------------------------------------
def run_setup(shared: Shared, args: argparse.Namespace, name: str, nodes: int, adapters: list[str],
              models: list[str]) -> dict[str, Any]:
    with ExitStack() as stack:
        started = time.monotonic()
        cluster = start_cluster(stack, shared, name, nodes, args.pin)
        gateway = start_gateway(stack, shared, name, cluster[0], replicas=nodes)
        placement = wait_for_replicas(cluster)
        log(f"{name}: ready in {time.monotonic() - started:.0f} s; engine replicas per node {placement}; "
            f"warm-up ({len(adapters)} requests, one per adapter, then {args.warmup}), "
            f"then {len(models)} measured requests")
        results, errors, wall, warm = asyncio.run(drive(gateway, args, adapters, models))
        row = summarize(name, nodes, results, errors, wall, placement)
        row["warmup_requests_per_replica"] = dict(Counter(r.replica for r in warm))
        log(f"{name}: {row['tok_s']:.1f} tok/s, p50 {row['latency_p50_ms']:.0f} ms, "
            f"p95 {row['latency_p95_ms']:.0f} ms, {row['errors']} errors"
            + (f" (first: {errors[0]})" if errors else ""))
        log(f"{name}: stopping the gateway and the nodes")
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench-cluster"),
                        help="cached model and adapters (assets/) and each run's logs (run-<time>/)")
    parser.add_argument("--requests", type=int, default=192, help="measured requests per setup")
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    parser.add_argument("--adapters", type=int, default=20, help="demo adapters in the store (Zipf over them)")
    parser.add_argument("--warmup", type=int, default=64,
                        help="unmeasured Zipf requests at full concurrency after one request per adapter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Zipf adapter sequence")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let every node use every core (default: node i is pinned to core i, a machine of its "
                             "own, so two nodes have twice the cores of one, as two machines would)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    work_dir = args.work_dir.resolve()
    adapters = [demo_adapter_name(i) for i in range(args.adapters)]
    models = workload("zipf", args.requests, TINY_MODEL, adapters, args.seed)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with ExitStack() as stack:
        stack.callback(lambda: log("every process stopped"))
        shared = shared_setup(stack, work_dir, adapters)
        for name, nodes in (("one-node", 1), ("two-nodes", 2)):
            rows.append(run_setup(shared, args, name, nodes, adapters, models))
        log(f"stopping the ledger and S3 (logs in {shared.run_dir})")
    print_report(rows, args)
    log(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        report = {"rows": rows, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "cores": os.cpu_count(), "model": TINY_MODEL,
                  "ratio_tok_s": rows[1]["tok_s"] / rows[0]["tok_s"] if len(rows) == 2 else None}
        args.json.write_text(json.dumps(report, indent=1))
        log(f"results written to {args.json}")
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
