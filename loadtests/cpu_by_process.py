"""CPU per process of a running server's tree, idle or under a streaming load.

    .venv/bin/python loadtests/cpu_by_process.py PID                       # idle, 20 s
    .venv/bin/python loadtests/cpu_by_process.py PID --load http://127.0.0.1:8000 --model demo-adapter-000

PID is the server's top process (`gateway up`, or vLLM's API server). With --load, 32 streams of
64-token completions run during the window. Prints cores busy per process, largest first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.bench_serving import OpenAIHttpClient, run_requests  # noqa: E402


def cpu_seconds(root: psutil.Process) -> dict[int, tuple[float, str]]:
    found: dict[int, tuple[float, str]] = {}
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            found[proc.pid] = (times.user + times.system, " ".join(proc.cmdline())[:90] or proc.name())
    return found


async def measure(pid: int, seconds: float, load: str | None, model: str,
                  api_key: str | None = None) -> list[tuple[float, str]]:
    root = psutil.Process(pid)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    client = OpenAIHttpClient(load, 32, headers) if load else None
    loader = None
    if client:
        await run_requests(client, [model] * 32, 32)  # warm up
        loader = asyncio.create_task(run_requests(client, [model] * 100_000, 32))
        await asyncio.sleep(2)
    before = cpu_seconds(root)
    await asyncio.sleep(seconds)
    after = cpu_seconds(root)
    if loader:
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
    if client:
        await client.aclose()
    rows = [((after[p][0] - before[p][0]) / seconds, after[p][1]) for p in after if p in before]
    return sorted(rows, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--load", help="base URL to stream completions from during the window")
    parser.add_argument("--model", default="demo-adapter-000")
    parser.add_argument("--api-key", help="key for --load (the local one is in <state>/local-api-key)")
    args = parser.parse_args()
    rows = asyncio.run(measure(args.pid, args.seconds, args.load, args.model, args.api_key))
    for cores, name in rows:
        print(f"{cores:8.3f}  {name}")
    print(f"{sum(c for c, _ in rows):8.3f}  total cores")


if __name__ == "__main__":
    main()
