"""CPU per process of a running server's tree, idle or under a streaming load.

    .venv/bin/python loadtests/cpu_by_process.py PID                       # idle, 20 s
    .venv/bin/python loadtests/cpu_by_process.py PID --load http://127.0.0.1:8000 --model demo-adapter-000

PID is the server's top process (`gateway up`, or vLLM's API server). With --load, 32 streams of
64-token completions run during the window. Prints cores busy per process, largest first, and with
--load the output tokens/s of the streams that ended in the window and each process's CPU-seconds
per 1k of those tokens (comparable between servers of different speeds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.bench_serving import OpenAIHttpClient, StreamResult, run_requests  # noqa: E402


def cpu_seconds(root: psutil.Process) -> dict[int, tuple[float, str]]:
    found: dict[int, tuple[float, str]] = {}
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            found[proc.pid] = (times.user + times.system, " ".join(proc.cmdline())[:90] or proc.name())
    return found


async def measure(pid: int, seconds: float, load: str | None, model: str,
                  api_key: str | None = None) -> tuple[list[tuple[float, str]], int]:
    """(cores busy per process, output tokens of the streams that ended in the window)."""
    root = psutil.Process(pid)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    client = OpenAIHttpClient(load, 32, headers) if load else None
    loader = None
    finished: list[StreamResult] = []
    if client:
        await run_requests(client, [model] * 32, 32)  # warm up
        loader = asyncio.create_task(run_requests(client, [model] * 100_000, 32, finished))
        await asyncio.sleep(2)
    before, ended_before = cpu_seconds(root), len(finished)
    await asyncio.sleep(seconds)
    after, ended_after = cpu_seconds(root), len(finished)
    if loader:
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
    if client:
        await client.aclose()
    rows = [((after[p][0] - before[p][0]) / seconds, after[p][1]) for p in after if p in before]
    return sorted(rows, reverse=True), sum(r.tokens for r in finished[ended_before:ended_after])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--load", help="base URL to stream completions from during the window")
    parser.add_argument("--model", default="demo-adapter-000")
    parser.add_argument("--api-key", help="key for --load (the local one is in <state>/local-api-key)")
    args = parser.parse_args()
    rows, tokens = asyncio.run(measure(args.pid, args.seconds, args.load, args.model, args.api_key))
    per_1k = 1000 / tokens * args.seconds if tokens else None  # CPU-seconds per 1k tokens per busy core
    print(f"   cores  {'CPU-s/1k tok  ' if per_1k else ''}process")
    for cores, name in rows:
        print(f"{cores:8.3f}  {f'{cores * per_1k:12.3f}  ' if per_1k else ''}{name}")
    total = sum(c for c, _ in rows)
    print(f"{total:8.3f}  {f'{total * per_1k:12.3f}  ' if per_1k else ''}total")
    if args.load:
        print(f"output tokens/s of the streams that ended in the window: {tokens / args.seconds:.1f}")


if __name__ == "__main__":
    main()
