"""Gateway throughput with influence attribution on vs off, side by side in one run.

Two gateways on one state directory (the demo model, datanets and adapters, whose recorded method is
`verbatim+influence-v1`), one with `GATEWAY_ATTRIBUTION_INFLUENCE=false` (verbatim spans only), measured
in alternating rounds with the workload of `bench_serving.py` (streams of 64 tokens, 32 in flight) on the
demo adapters of the model, mixed evenly. Influence is scored off the response path, so the client-side figures alone
would hide its cost: after each round the benchmark waits until every response of the round has its trace
(attribution has caught up) before the next round starts, and reports that wait and the methods the
traces were written with (under load the lag policy bills what it cannot reach in time as
`unattributed-overload`). Throughput is given both as the client sees it and up to the last trace.

    .venv/bin/python loadtests/bench_influence_overhead.py --rounds 3 [--model datanet-tiny-llama]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attribution_overhead import (  # noqa: E402
    Settle,
    alternate_gateways,
    bench,
    paired_arguments,
    paired_state_dir,
)
from bench_serving import log  # noqa: E402

from attribution.service import TRACE_FILE_SUFFIX  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.demo_data import demo_adapter_name, demo_datanets  # noqa: E402
from ledger.client.trace_wire import trace_from_bytes  # noqa: E402
from serving.config import PRETRAINED_MODEL, TINY_MODEL  # noqa: E402
from statedir.layout import StateLayout  # noqa: E402

VARIANTS = {"influence on": {}, "influence off": {"GATEWAY_ATTRIBUTION_INFLUENCE": "false"}}
DRAIN_TIMEOUT_SECONDS = 900.0


def trace_methods(trace_dir: Path, since: float) -> Counter[str]:
    """How many traces written at or after `since` (a time.time()) carry each attribution method."""
    methods: Counter[str] = Counter()
    for path in _traces_since(trace_dir, since):
        try:
            methods[trace_from_bytes(path.read_bytes()).method] += 1
        except (OSError, ValueError):
            methods["unreadable"] += 1
    return methods


def _traces_since(trace_dir: Path, since: float) -> list[Path]:
    found = []
    for path in trace_dir.glob(f"*{TRACE_FILE_SUFFIX}"):
        try:
            if path.stat().st_mtime >= since:
                found.append(path)
        except OSError:  # replaced or pruned while listed
            continue
    return found


def trace_settler(trace_dir: Path) -> Settle:
    """Waits until every response of a round has its trace (stat only while waiting), then reads their methods."""

    async def settle(since: float, expected: int) -> tuple[dict[str, Any], str]:
        started = time.monotonic()
        while len(_traces_since(trace_dir, since)) < expected and time.monotonic() - started < DRAIN_TIMEOUT_SECONDS:
            await asyncio.sleep(0.5)
        waited = time.monotonic() - started
        methods = trace_methods(trace_dir, since)
        return ({"drain_s": waited, "methods": methods},
                f"; last trace {waited:.1f} s after the last response "
                f"({', '.join(f'{m} {c}' for m, c in methods.most_common())})")

    return settle


def main() -> int:
    parser = paired_arguments(__doc__.split("\n\n")[0], 18400)
    parser.add_argument("--model", default=PRETRAINED_MODEL, choices=(PRETRAINED_MODEL, TINY_MODEL),
                        help="embedded base model (default: the gateway's own default, the pretrained one)")
    args = parser.parse_args()
    state = paired_state_dir(args, "bench-influence-")
    adapters = [demo_adapter_name(datanet)
                for datanet in demo_datanets(GatewayConfig(state_dir=state, base_model=args.model))]
    log(f"model {args.model}, adapters {', '.join(adapters)}")
    models = [adapters[i % len(adapters)] for i in range(args.requests)]
    settle = trace_settler(StateLayout(state).traces)
    rounds = alternate_gateways(state, VARIANTS, args, env={"GATEWAY_BASE_MODEL": args.model},
                                run=lambda servers: bench(servers, args, models, settle))
    for runs in rounds.values():
        for r in runs:
            r["traced_tok_s"] = r["tokens"] / (r["wall_s"] + r["drain_s"])
    keys = ("tok_s", "traced_tok_s", "ttft_p50", "itl_p50", "drain_s")
    figures = {name: {key: statistics.median(r[key] for r in runs) for key in keys} for name, runs in rounds.items()}
    print(f"{'':16}{'tok/s':>9}{'tok/s to last trace':>21}{'TTFT p50 ms':>13}{'ITL p50 ms':>12}{'trace lag s':>13}")
    for name, f in figures.items():
        print(f"{name:16}{f['tok_s']:>9.1f}{f['traced_tok_s']:>21.1f}{f['ttft_p50']:>13.1f}{f['itl_p50']:>12.2f}"
              f"{f['drain_s']:>13.1f}")
    on, off = figures["influence on"], figures["influence off"]
    print(f"throughput on/off: {on['tok_s'] / off['tok_s']:.3f} as clients see it, "
          f"{on['traced_tok_s'] / off['traced_tok_s']:.3f} up to the last trace; medians of {args.rounds} rounds, "
          f"{args.requests} requests x 64 tokens, {args.concurrency} streams, adapters {', '.join(adapters)}, "
          f"model {args.model}")
    for name, runs in rounds.items():
        total = sum((r["methods"] for r in runs), Counter())
        print(f"traces of the {name} rounds by method: " + ", ".join(f"{m} {c}" for m, c in total.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
