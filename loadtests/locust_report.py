"""Summarize a Locust run of loadtests/locustfile.py from the `*_stats.csv` it wrote.

Per user kind (Locust's "Type": openai-stream, openai, openai-chat-stream, grpc-stream): requests, failures, requests/s
and latency p50/p90/p99 of the whole request, and for the streaming kinds TTFT and ITL p50/p90/p99.
Times are milliseconds as Locust wrote them (integers below 100 ms, 2 significant digits above).

    .venv/bin/python loadtests/locust_report.py loadtests/reports/<timestamp>/       # or a *_stats.csv
    .venv/bin/python loadtests/locust_report.py --json loadtests/reports/<timestamp>/
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REQUEST, TTFT, ITL = "request", "TTFT", "ITL"  # entry names, as in loadtests/locustfile.py
PERCENTILES = ("50%", "90%", "99%")


@dataclass(frozen=True)
class Entry:
    """One row of the stats CSV; percentiles in ms, None when the entry has no successes."""

    kind: str
    name: str
    requests: int
    failures: int
    requests_per_second: float
    average_ms: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


def stats_csv(path: Path) -> Path:
    """`path` itself, or the one `*_stats.csv` in the directory `path`."""
    if path.is_file():
        return path
    found = sorted(path.glob("*_stats.csv"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one *_stats.csv in {path}, found {[p.name for p in found]}")
    return found[0]


def number(text: str) -> float | None:
    return None if text in ("", "N/A") else float(text)


def read_entries(path: Path) -> dict[tuple[str, str], Entry]:
    """Entries by (kind, name), without Locust's "Aggregated" row (it mixes requests with TTFT and ITL)."""
    entries = {}
    with stats_csv(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                continue
            p50, p90, p99 = (number(row[p]) for p in PERCENTILES)
            entries[(row["Type"], row["Name"])] = Entry(
                kind=row["Type"], name=row["Name"], requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]), requests_per_second=float(row["Requests/s"]),
                average_ms=float(row["Average Response Time"]), p50_ms=p50, p90_ms=p90, p99_ms=p99)
    return entries


def summary(path: Path) -> dict[str, dict[str, Entry]]:
    """{kind: {"request" | "TTFT" | "ITL" | other name: Entry}}, kinds in the CSV's order."""
    kinds: dict[str, dict[str, Entry]] = {}
    for (kind, name), entry in read_entries(path).items():
        kinds.setdefault(kind, {})[name] = entry
    return kinds


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def render(kinds: dict[str, dict[str, Entry]]) -> str:
    width = max([14, *map(len, kinds)])
    header = (f"{'kind':<{width}} {'requests':>8} {'failures':>8} {'req/s':>7}  {'request p50/p90/p99 ms':>22}"
              f"  {'TTFT p50/p90/p99 ms':>20}  {'ITL p50/p90/p99 ms':>19}")
    lines = [header, "-" * len(header)]
    for kind, entries in kinds.items():
        request = entries.get(REQUEST)

        def triple(name: str) -> str:
            entry = entries.get(name)
            if entry is None:
                return "-"
            return "/".join(milliseconds(v) for v in (entry.p50_ms, entry.p90_ms, entry.p99_ms))

        if request is None:  # e.g. "setup GET /v1/models", only when a user could not start
            lines += [f"{kind:<{width}} {e.requests:>8} {e.failures:>8} {e.requests_per_second:>7.2f}  ({e.name})"
                      for e in entries.values()]
            continue
        lines.append(f"{kind:<{width}} {request.requests:>8} {request.failures:>8} {request.requests_per_second:>7.2f}"
                     f"  {triple(REQUEST):>22}  {triple(TTFT):>20}  {triple(ITL):>19}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run's report directory or its *_stats.csv")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        kinds = summary(args.path)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"locust_report: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({kind: {name: asdict(e) for name, e in entries.items()} for kind, entries in kinds.items()},
                         indent=2))
    else:
        print(render(kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
