"""Figures for one base model on this machine: engine start, output tokens/s, memory of the stack.

1. First install (only when the model is not yet in the state directory): wall seconds of
   `ensure_demo_assets`, i.e. the model plus `--demo-adapters` random adapters.
2. Engine start: wall seconds from launching `gateway up` (fresh ports, no demo datanets) until its
   HTTP and gRPC front doors are healthy, on a state directory where the model is installed.
3. Output tokens/s and TTFT p50 per cell: targets base model / one adapter (demo-adapter-000) /
   Zipf(alpha=1) over the demo adapters, each at 1 and at 32 streams in flight. A cell is a short
   warm-up, then `--requests` streamed completions (at 1 stream `--requests-1`) of 64 tokens,
   temperature 0, ignore_eos, authenticated with the gateway's local key (as bench_serving.py).
4. Memory: the sum of RSS (and of PSS, which counts shared pages once) over the gateway's process
   tree plus the processes of its Ray session, sampled every 0.5 s from launch to the end of the
   last cell: idle after start (median over `--idle-seconds`), peak under load, peak overall.

Run from the repository root (full run, under ~10 minutes; smoke test: `--model datanet-tiny-llama
--requests 16`):

    .venv/bin/python loadtests/bench_model.py --model smollm2-135m-instruct [--state-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.config import GatewayConfig  # noqa: E402
from gateway.supervisor import ensure_demo_assets  # noqa: E402
from loadtests.bench_serving import (  # noqa: E402
    MAX_TOKENS,
    GatewayServer,
    OpenAIHttpClient,
    ProcessTree,
    _sigterm,
    log,
    measured_round,
    run_requests,
    workload,
)
from serving.config import PRETRAINED_MODEL, TINY_MODEL  # noqa: E402
from tests.support.launcher import GatewayProcess  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from training.demo_assets import demo_adapter_name  # noqa: E402

MIB = 1024 * 1024
TARGETS = ("base", "adapter", "zipf")


class MemorySampler(threading.Thread):
    """Sums RSS and PSS (MiB) over a gateway's process tree every `period` s, from its launch until `stop`."""

    def __init__(self, gateway: GatewayProcess, period: float = 0.5) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.gateway, self.period = gateway, period
        self.samples: list[tuple[float, float, float, int]] = []  # (monotonic, rss, pss, processes)
        self._stop_event = threading.Event()

    def run(self) -> None:
        tree: ProcessTree | None = None
        due = time.monotonic()
        while True:
            due = max(due + self.period, time.monotonic())  # a fixed rate, unless a sample overran
            if self._stop_event.wait(due - time.monotonic()):
                return
            try:
                if tree is None:
                    if self.gateway.process is None:
                        continue
                    tree = ProcessTree(self.gateway.process.pid)
                rss = pss = count = 0
                for proc in tree.processes():
                    try:
                        info = proc.memory_full_info()
                    except psutil.Error:
                        continue
                    rss, pss, count = rss + info.rss, pss + info.pss, count + 1
                self.samples.append((time.monotonic(), rss / MIB, pss / MIB, count))
            except psutil.Error:  # the root exited (start failed): nothing left to sample
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def between(self, start: float, end: float = float("inf")) -> list[tuple[float, float, float, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def memory_figures(samples: list[tuple[float, float, float, int]], how: Callable[[list[float]], float]) -> dict[str, float]:
    if not samples:
        return {"rss_mib": float("nan"), "pss_mib": float("nan"), "processes": float("nan")}
    return {"rss_mib": how([s[1] for s in samples]), "pss_mib": how([s[2] for s in samples]),
            "processes": how([float(s[3]) for s in samples])}


def models_for(target: str, count: int, seed: int, base: str, adapters: list[str]) -> list[str]:
    """The model of each request of a cell, in dispatch order."""
    return workload({"base": "base", "adapter": "single"}.get(target, "zipf"), count, base, adapters, seed)


async def measure_cells(server: GatewayServer, base: str, adapters: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    cells = []
    for streams in args.streams:
        client = OpenAIHttpClient(server.base_url, streams, server.headers)
        count = args.requests if streams > 1 else args.requests_1
        if count < streams:
            log(f"note: {count} requests cannot keep {streams} streams in flight")
        try:
            for target in TARGETS:
                warmup = models_for(target, max(2, streams), args.seed - 1, base, adapters)
                log(f"{target} @{streams} in flight: warm-up ({len(warmup)} requests), then {count} requests")
                await run_requests(client, warmup, streams)
                result = await measured_round(server, client, models_for(target, count, args.seed, base, adapters),
                                              streams)
                s = result["summary"]
                log(f"{target} @{streams} in flight: {s['tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50']:.1f} ms, "
                    f"ITL p50 {s['itl_p50']:.2f} ms, {s['errors']:.0f} errors")
                for error in result["errors"][:3]:
                    log(f"  error: {error}")
                cells.append({"target": target, "streams": streams, "requests": count, **s,
                              "first_errors": result["errors"][:3], "raw": result["requests"]})
        finally:
            await client.aclose()
    return cells


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n=== {report['model']} on {os.cpu_count()} cores: streams of {MAX_TOKENS} tokens, temperature 0, "
          f"ignore_eos; {args.requests} requests per cell ({args.requests_1} at 1 stream) ===")
    install = report["first_install_s"]
    print(f"first install (model + {args.demo_adapters} adapters): "
          + (f"{install:.1f} s" if install is not None else "not needed (already in the state directory)"))
    print(f"engine start (gateway up -> healthy): {report['engine_start_s']:.1f} s"
          + (" (first start of this state directory)" if report["fresh_state"] else ""))
    mem = report["memory"]
    for key, label in (("idle", "idle after start"), ("peak_load", "peak under load"), ("peak", "peak overall")):
        m = mem[key]
        print(f"memory {label:17}: RSS sum {m['rss_mib']:8.0f} MiB, PSS sum {m['pss_mib']:8.0f} MiB "
              f"({m['processes']:.0f} processes)")
    labels = {"base": f"base ({report['served_model']})", "adapter": "one adapter (demo-adapter-000)",
              "zipf": f"zipf over {len(report['adapters'])} adapters"}
    header = "".join(f"{f'tok/s @{n}':>12}{f'TTFT p50 @{n}':>15}" for n in args.streams)
    print(f"\n{'':36}{header}{'errors':>8}")
    for target in TARGETS:
        cells = {c["streams"]: c for c in report["cells"] if c["target"] == target}
        line = "".join(f"{cells[n]['tok_s']:>12.1f}{cells[n]['ttft_p50']:>12.1f} ms" for n in args.streams)
        print(f"{labels[target]:36}{line}{sum(c['errors'] for c in cells.values()):>8.0f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[PRETRAINED_MODEL, TINY_MODEL], default=PRETRAINED_MODEL)
    parser.add_argument("--state-dir", type=Path, help="gateway state dir (reused if given; default a new temp dir)")
    parser.add_argument("--requests", type=int, default=128, help="measured requests per cell above 1 stream")
    parser.add_argument("--requests-1", type=int, help="measured requests per cell at 1 stream "
                        "(default max(4, requests / 16))")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32], help="streams in flight, one cell each")
    parser.add_argument("--demo-adapters", type=int, default=100, help="demo adapters built and used by zipf")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle window after start for memory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Zipf adapter sequence")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)
    args.requests_1 = args.requests_1 or max(4, args.requests // 16)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    os.environ["GATEWAY_BASE_MODEL"] = args.model  # this process's config and the gateway's
    state_dir = (args.state_dir or Path(tempfile.mkdtemp(prefix="bench-model-", dir="/tmp"))).resolve()
    config = GatewayConfig(state_dir=state_dir, demo_adapters=args.demo_adapters)
    if config.base_model_path or "://" in config.store_url:
        raise SystemExit("the benchmark needs the embedded model and a local adapter store "
                         "(unset GATEWAY_BASE_MODEL_PATH and GATEWAY_ADAPTER_STORE)")
    installed = config.model_path.exists()
    fresh_state = not (state_dir / "gateway.log").exists()
    log(f"state dir {state_dir}; model {args.model} {'installed' if installed else 'not installed yet'}")
    start = time.perf_counter()
    ensure_demo_assets(config)
    assets_s = time.perf_counter() - start
    log(f"demo assets ready in {assets_s:.1f} s")
    adapters = [demo_adapter_name(i) for i in range(args.demo_adapters)]

    server = GatewayServer(state_dir, free_port())
    server.process.grpc_port = free_port()
    server.process.env.update({
        "GATEWAY_BASE_MODEL": args.model, "GATEWAY_DEMO_ADAPTERS": str(args.demo_adapters),
        "GATEWAY_DEMO_DATANETS": "0", "GATEWAY_CHAIN_PORT": str(free_port()),
        "GATEWAY_LEDGER_PORT": str(free_port()), "GATEWAY_METRICS_PORT": "0", "GATEWAY_LEDGER_METRICS_PORT": "0"})
    sampler = MemorySampler(server.process)
    try:
        log(f"starting the gateway (log {state_dir / 'gateway.log'})")
        sampler.start()
        launched = time.monotonic()
        server.start()
        healthy = time.monotonic()
        log(f"healthy after {healthy - launched:.1f} s; idle for {args.idle_seconds:.0f} s")
        time.sleep(args.idle_seconds)
        load_start = time.monotonic()
        cells = asyncio.run(measure_cells(server, config.served_model_name, adapters, args))
        sampler.stop()
        report = {
            "model": args.model, "served_model": config.served_model_name, "state_dir": str(state_dir),
            "adapters": adapters, "fresh_state": fresh_state,
            "first_install_s": None if installed else assets_s, "assets_check_s": assets_s if installed else None,
            "engine_start_s": healthy - launched, "cells": cells,
            "memory": {"idle": memory_figures(sampler.between(healthy, load_start), statistics.median),
                       "peak_load": memory_figures(sampler.between(load_start), max),
                       "peak": memory_figures(sampler.samples, max)},
            "memory_samples": [[round(t - launched, 2), round(r, 1), round(p, 1), n] for t, r, p, n in sampler.samples],
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        print_report(report, args)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
            log(f"figures written to {args.json}")
        return 0
    finally:
        if sampler.is_alive():
            sampler.stop()
        log("stopping the gateway")
        server.stop()
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
