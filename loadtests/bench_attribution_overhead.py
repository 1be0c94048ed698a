"""Gateway throughput with attribution on vs off, side by side in one run.

Two gateways on one state directory (the demo model, datanets and adapters), one with
`GATEWAY_ATTRIBUTION=false`, measured in alternating rounds with the workload of
`bench_serving.py` (streams of 64 tokens, 32 in flight) on the demo adapters that have a lineage
(their output is attributed against the datanet indexes), mixed 50/50. Prints output tokens/s,
TTFT and ITL per server and the ratio on/off (goal ≥ 0.9).

    .venv/bin/python loadtests/bench_attribution_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serving import GatewayServer, OpenAIHttpClient, check_port_free, log, measured_round, run_requests  # noqa: E402

from gateway.demo_data import demo_adapter_name  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from training.demo_passages import DEMO_DATANETS  # noqa: E402

ADAPTERS = [demo_adapter_name(d) for d in DEMO_DATANETS]


Settle = Callable[[float, int], Awaitable[tuple[dict[str, Any], str]]]
"""Called after each warm-up and round with (its start, a time.time(), its requests): waits for whatever the
round leaves behind and returns figures to add to the round's and a note for its log line."""


async def bench(servers: dict[str, GatewayServer], args: argparse.Namespace, models: list[str] | None = None,
                settle: Settle | None = None) -> dict[str, list[dict]]:
    """Warm each server up, then `args.rounds` rounds of `models` (default: the demo adapters, mixed) on each in
    turn; per server, the summary of each round (with what `settle` adds)."""
    clients = {name: OpenAIHttpClient(s.base_url, args.concurrency, s.headers) for name, s in servers.items()}
    models = models or [ADAPTERS[i % len(ADAPTERS)] for i in range(args.requests)]
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for name, client in clients.items():
            log(f"warm-up of {name}")
            since, warm = time.time(), models[: args.concurrency * 2]
            await run_requests(client, warm, args.concurrency)
            if settle is not None:
                await settle(since, len(warm))
        for index in range(args.rounds):
            for name, server in servers.items():
                since = time.time()
                result = await measured_round(server, clients[name], models, args.concurrency)
                s = dict(result["summary"])
                extra, note = await settle(since, len(models)) if settle is not None else ({}, "")
                s.update(extra)
                log(f"round {index + 1}/{args.rounds} {name}: {s['tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50']:.1f} ms, "
                    f"ITL p50 {s['itl_p50']:.2f} ms, {s['errors']:.0f} errors{note}")
                rounds[name].append(s)
    finally:
        for client in clients.values():
            await client.aclose()
    return rounds


def alternate_gateways(state: Path, variants: dict[str, dict[str, str]], args: argparse.Namespace,
                       run: Callable[[dict[str, GatewayServer]], Awaitable[dict[str, list[dict]]]] | None = None,
                       env: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Start one gateway per variant (its extra env, over `env`) on one state directory and `run` the rounds
    on them (default: `bench`).

    They share the local chain and the ledger; HTTP and gRPC ports follow from `args.port`.
    """
    shared = {"GATEWAY_CHAIN_PORT": str(free_port()), "GATEWAY_LEDGER_PORT": str(free_port()),
              "GATEWAY_DEMO_ADAPTERS": "0", **(env or {})}
    servers = {name: GatewayServer(state, args.port + 2 * i) for i, name in enumerate(variants)}
    for name, server in servers.items():
        server.process.env.update({**shared, **variants[name]})
    try:
        for name, server in servers.items():  # one after the other: the first builds the demo data
            log(f"starting the gateway with {name} (state {state})")
            server.start()
        return asyncio.run(run(servers) if run is not None else bench(servers, args))
    finally:
        for server in servers.values():
            server.stop()


def paired_arguments(description: str, port: int) -> argparse.ArgumentParser:
    """The options of a two-gateway benchmark: rounds, workload, state dir and the first of its four ports."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--state-dir", type=Path, help="reuse a state dir (default: a new temp dir)")
    parser.add_argument("--port", type=int, default=port, help="first of four ports (HTTP and gRPC of both)")
    return parser


def paired_state_dir(args: argparse.Namespace, prefix: str) -> Path:
    """The state directory to run in (after checking the four ports are free)."""
    for port in range(args.port, args.port + 4):
        check_port_free(port)
    return (args.state_dir or Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))).resolve()


def main() -> int:
    args = paired_arguments(__doc__.split("\n\n")[0], 18300).parse_args()
    state = paired_state_dir(args, "bench-attribution-")
    rounds = alternate_gateways(state, {"attribution on": {}, "attribution off": {"GATEWAY_ATTRIBUTION": "false"}}, args)
    figures = {name: {key: statistics.median(r[key] for r in runs) for key in ("tok_s", "ttft_p50", "itl_p50")}
               for name, runs in rounds.items()}
    on, off = figures["attribution on"], figures["attribution off"]
    print(f"{'':18}{'tok/s':>10}{'TTFT p50 ms':>14}{'ITL p50 ms':>12}")
    for name, f in figures.items():
        print(f"{name:18}{f['tok_s']:>10.1f}{f['ttft_p50']:>14.1f}{f['itl_p50']:>12.2f}")
    print(f"throughput on/off: {on['tok_s'] / off['tok_s']:.3f} (goal >= 0.9); medians of {args.rounds} rounds, "
          f"{args.requests} requests x 64 tokens, {args.concurrency} streams, adapters {', '.join(ADAPTERS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
