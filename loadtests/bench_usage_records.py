"""What the durable usage record costs: the gateway with it (the default) against the gateway without it.

Every response's usage record is made durable (group-committed, fsync'd) before its last byte leaves
(attribution/usage_log.py). This script runs two gateways at once on the same demo model and
adapters, one with `GATEWAY_LEDGER_USAGE_RECORDS=false`, and alternates measured rounds between them
(on, off, on, off, ...): `--requests` streamed completions of 64 tokens per round, `--concurrency`
in flight, every request on one adapter or Zipf over 100 (`--mode`). It prints the medians of output
tokens/s, TTFT and ITL per gateway and the ratio on/off, which the trust issue asks to be >= 0.97.

    .venv/bin/python loadtests/bench_usage_records.py [--rounds 4] [--requests 128] [--mode single]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.config import GatewayConfig  # noqa: E402
from gateway.readiness import READY_TIMEOUT_SECONDS  # noqa: E402
from gateway.supervisor import ensure_demo_assets  # noqa: E402
from loadtests.bench_serving import (  # noqa: E402
    MODES,
    NUM_ADAPTERS,
    OpenAIHttpClient,
    ProcessTree,
    Server,
    log,
    measured_round,
    run_requests,
    workload,
)
from tests.support.launcher import GatewayProcess  # noqa: E402
from training.demo_assets import demo_adapter_name  # noqa: E402

ROWS = [("tok_s", "output tokens/s", "{:.1f}"), ("ttft_p50", "TTFT p50 (ms)", "{:.1f}"),
        ("ttft_p90", "TTFT p90 (ms)", "{:.1f}"), ("itl_p50", "ITL p50 (ms)", "{:.2f}"),
        ("itl_p99", "ITL p99 (ms)", "{:.2f}"), ("cpu_per_1k", "server CPU-s / 1k tokens", "{:.3f}"),
        ("errors", "errors (per round)", "{:.0f}")]


class Gateway(Server):
    """`gateway up` on the shared demo assets, usage records on or off."""

    def __init__(self, name: str, assets: Path, state_dir: Path, port: int, usage_records: bool) -> None:
        super().__init__(name, port, [])
        config = GatewayConfig(state_dir=assets)
        self.process = GatewayProcess(state_dir, port, grpc_port=port + 1, env={
            "GATEWAY_BASE_MODEL_PATH": str(config.model_path), "GATEWAY_ADAPTER_STORE": config.store_url,
            "GATEWAY_LEDGER_USAGE_RECORDS": str(usage_records).lower(), "GATEWAY_CHAIN_PORT": str(port + 2),
            "GATEWAY_LEDGER_PORT": str(port + 3), "GATEWAY_METRICS_PORT": "0", "GATEWAY_SETTLE_PERIODIC": "false",
            "GATEWAY_DEPOSITS_WATCH": "false"})

    @property
    def headers(self) -> dict[str, str]:
        return self.process.headers

    def start(self) -> None:
        self.process.start(READY_TIMEOUT_SECONDS)
        self.tree = ProcessTree(self.process.process.pid)  # type: ignore[union-attr]

    def terminate(self) -> None:
        self.process.stop()


async def bench(args: argparse.Namespace, gateways: list[Gateway], base: str, adapters: list[str]) -> dict[str, Any]:
    clients = {g.name: OpenAIHttpClient(g.base_url, args.concurrency, g.headers) for g in gateways}
    rounds: list[dict[str, Any]] = []
    try:
        for gateway in gateways:
            log(f"warm-up of {gateway.name} ({args.warmup} requests)")
            await run_requests(clients[gateway.name], workload(args.mode, args.warmup, base, adapters, args.seed - 1),
                               args.concurrency)
        for index in range(args.rounds):
            models = workload(args.mode, args.requests, base, adapters, args.seed + index)
            order = gateways if index % 2 == 0 else gateways[::-1]  # neither always goes first
            for gateway in order:
                result = await measured_round(gateway, clients[gateway.name], models, args.concurrency)
                s = result["summary"]
                log(f"round {index + 1}/{args.rounds}: {gateway.name}: {s['tok_s']:.1f} tok/s, TTFT p50 "
                    f"{s['ttft_p50']:.1f} ms, ITL p50 {s['itl_p50']:.2f} ms, {s['errors']:.0f} errors")
                for error in result["errors"][:3]:
                    log(f"  error: {error}")
                rounds.append({"round": index, "server": gateway.name, **result["summary"]})
    finally:
        for client in clients.values():
            await client.aclose()
    return {"rounds": rounds}


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    def median(server: str, key: str) -> float:
        return statistics.median(r[key] for r in report["rounds"] if r["server"] == server)

    print(f"\n=== durable usage records on vs off: {args.rounds} rounds x {args.requests} streamed completions "
          f"(64 tokens, concurrency {args.concurrency}, mode {args.mode}); medians over rounds ===")
    print(f"{'':28}{'on':>12}{'off':>12}{'on/off':>10}")
    for key, label, fmt in ROWS:
        on, off = median("on", key), median("off", key)
        print(f"{label:28}{fmt.format(on):>12}{fmt.format(off):>12}{(on / off if off else float('nan')):>10.3f}")
    per_round = [r["tok_s"] for r in report["rounds"]]
    pairs = [on["tok_s"] / off["tok_s"] for on, off in zip(
        [r for r in report["rounds"] if r["server"] == "on"], [r for r in report["rounds"] if r["server"] == "off"])]
    print(f"throughput ratio on/off per round: {', '.join(f'{p:.3f}' for p in pairs)} "
          f"(rounds ranged {min(per_round):.0f}-{max(per_round):.0f} tok/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="single")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=18300, help="first of 8 consecutive ports")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as tmp:
        assets = Path(tmp) / "assets"
        log("building the demo model and adapters (once)")
        config = GatewayConfig(state_dir=assets, demo_adapters=NUM_ADAPTERS)
        ensure_demo_assets(config)
        adapters = [demo_adapter_name(i) for i in range(NUM_ADAPTERS)]
        gateways = [Gateway("on", assets, Path(tmp) / "on", args.port, True),
                    Gateway("off", assets, Path(tmp) / "off", args.port + 4, False)]
        try:
            for gateway in gateways:
                log(f"starting the gateway with usage records {gateway.name}")
                gateway.start()
            report = asyncio.run(bench(args, gateways, config.served_model_name, adapters))
        finally:
            for gateway in gateways:
                gateway.stop()
    print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
