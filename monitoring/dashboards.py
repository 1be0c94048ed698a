"""The four Grafana dashboards of the gateway, built from `monitoring.panels`.

`DASHBOARDS` maps each dashboard's stable uid to the function that builds it; `panel_queries()`
lists every query with Grafana's variables expanded, so a test can run them against Prometheus.
`KNOWN_METRICS` is the contract with the instrumented processes: every metric a dashboard may
query, with its type (a histogram `h` is queried as `h_bucket`, `h_sum` and `h_count`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from monitoring.panels import (
    BUILTIN_VALUES,
    Grid,
    Panel,
    Target,
    dashboard,
    expand,
    gauge,
    mean,
    quantile,
    query_variable,
    rate,
    stat,
    timeseries,
)

MetricType = Literal["counter", "gauge", "histogram"]

KNOWN_METRICS: dict[str, MetricType] = {
    # Engine replicas (job gateway-engine).
    "gateway_requests_total": "counter",
    "gateway_requests_in_flight": "gauge",
    "gateway_time_to_first_token_seconds": "histogram",
    "gateway_inter_token_latency_seconds": "histogram",
    "gateway_request_duration_seconds": "histogram",
    "gateway_prompt_tokens_total": "counter",
    "gateway_completion_tokens_total": "counter",
    "gateway_adapter_loads_total": "counter",
    "gateway_adapter_evictions_total": "counter",
    "gateway_adapter_cache_hits_total": "counter",
    "gateway_adapter_load_seconds": "histogram",
    "gateway_adapters_resident": "gauge",
    "gateway_attribution_seconds": "histogram",
    "gateway_attribution_per_token_seconds": "histogram",
    "gateway_attributed_fraction": "histogram",
    "gateway_attribution_lag_seconds": "histogram",
    "gateway_attribution_queue_depth": "gauge",
    "gateway_attribution_deferred": "gauge",
    "gateway_attribution_shed_total": "counter",
    "gateway_hold_reports_refused_total": "counter",
    "gateway_rate_local_admissions_total": "counter",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:generation_tokens_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    "vllm:num_preemptions_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    # Gateway supervisor (job gateway).
    "gateway_outbox_traces": "gauge",
    "gateway_outbox_oldest_age_seconds": "gauge",
    "gateway_trace_send_failures_total": "counter",
    "gateway_traces_shipped_total": "counter",
    # Ledger service (job ledger).
    "ledger_traces_ingested_total": "counter",
    "ledger_ingest_batch_seconds": "histogram",
    "ledger_payout_batches": "gauge",
    "ledger_payout_amount_tokens": "gauge",
    "ledger_settlement_gas_used_total": "counter",
    # Prometheus itself.
    "up": "gauge",
}

JOBS = ("gateway", "gateway-engine", "ledger")
TAG = "datanet-gateway"
TOP = 10  # series kept by the "top adapters" panels

NON_2XX = 'status!~"2.."'
ADAPTER = 'adapter=~"$adapter"'
ADAPTER_NOT_BASE = f'{ADAPTER}, adapter!=""'


def series_names() -> set[str]:
    """Every series name the known metrics expose (histograms as `_bucket`, `_sum`, `_count`)."""
    names: set[str] = set()
    for name, kind in KNOWN_METRICS.items():
        names.update([f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name])
    return names


def _percentiles(histogram: str, *qs: float, matcher: str = "", prefix: str = "") -> list[Target]:
    return [Target(quantile(q, histogram, matcher), f"{prefix}p{round(q * 100)}") for q in qs]


def _base_model_named(expr: str) -> str:
    """Show the base model (adapter "") as `(base model)` in legends."""
    return f'label_replace({expr}, "adapter", "(base model)", "adapter", "")'


def _top_adapters(what: str, counter: str, *, description: str, unit: str = "short") -> Panel:
    """`what` by adapter for the TOP selected adapters with the highest rate of `counter`."""
    expr = f"topk({TOP}, sum by (adapter) ({rate(f'{counter}{{{ADAPTER}}}')}))"
    return timeseries(f"{what} by adapter (top {TOP})", Target(_base_model_named(expr), "{{adapter}}"), unit=unit,
                      description=description)


def _error_ratio(by: str = "") -> str:
    """Share of non-2xx responses (per `by` label if given).

    `errors or all * 0` makes the numerator 0 rather than empty while no error series exists yet,
    and still empty when the metric itself is missing (no `vector(0)` hiding an absent metric).
    """
    grouping = f" by ({by}) " if by else ""
    requests = rate("gateway_requests_total")
    errors = rate(f"gateway_requests_total{{{NON_2XX}}}")
    return f"sum{grouping}({errors} or {requests} * 0) / sum{grouping}({requests})"


# -- overview ---------------------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    requests = rate("gateway_requests_total")
    grid = Grid().add(
        stat("Requests/s", f"sum({requests})", unit="reqps", decimals=2,
             description="Requests finished per second, every API and status."),
        stat("Error ratio (non-2xx)", _error_ratio(), unit="percentunit", decimals=2,
             thresholds=((None, "green"), (0.01, "orange"), (0.05, "red")),
             description="Share of responses whose status is not 2xx (4xx and 5xx, 429 overload included)."),
        stat("TTFT p95", quantile(0.95, "gateway_time_to_first_token_seconds"), unit="s",
             thresholds=((None, "green"), (0.5, "orange"), (2, "red")),
             description="95th percentile of the time to the first token, every API."),
        stat("In flight", "sum(gateway_requests_in_flight)",
             description="Requests being served right now, every replica and API."),
        stat("Completion tokens/s", f"sum({rate('gateway_completion_tokens_total')})", unit="short", decimals=1,
             description="Generated tokens per second, every model and adapter."),
        stat("Targets up", Target(f'sum by (job) (up{{job=~"{"|".join(JOBS)}"}})', "{{job}}"),
             thresholds=((None, "red"), (1, "green")),
             description="Scraped targets answering, per job (gateway, gateway-engine, ledger); 0 = down."),
    ).new_row().add(
        timeseries("Requests/s by API and status",
                   Target(f"sum by (api, status) ({requests})", "{{api}} {{status}}"), unit="reqps", stack=True,
                   description="Finished requests per second, stacked by API and HTTP status."),
        timeseries("Error ratio by API (non-2xx)",
                   Target(_error_ratio("api"), "{{api}}"),
                   unit="percentunit", max=1,
                   description="Share of non-2xx responses per API."),
    ).new_row().add(
        timeseries("Time to first token",
                   [*_percentiles("gateway_time_to_first_token_seconds", 0.5, 0.95, 0.99),
                    *_percentiles("vllm:time_to_first_token_seconds", 0.95, prefix="engine ")],
                   unit="s", width=8,
                   description="Gateway TTFT p50/p95/p99 from the request's arrival; 'engine p95' is vLLM's own "
                               "measure, so the gap is the gateway's overhead."),
        timeseries("Inter-token latency",
                   [*_percentiles("gateway_inter_token_latency_seconds", 0.5, 0.95, 0.99),
                    *_percentiles("vllm:inter_token_latency_seconds", 0.95, prefix="engine ")],
                   unit="s", width=8,
                   description="Time between consecutive tokens of a response, p50/p95/p99 (and vLLM's p95)."),
        timeseries("Request duration (end to end)",
                   _percentiles("gateway_request_duration_seconds", 0.5, 0.95, 0.99), unit="s", width=8,
                   description="From arrival to the last byte, p50/p95/p99."),
    ).new_row().add(
        timeseries("Requests in flight by API",
                   Target("sum by (api) (gateway_requests_in_flight)", "{{api}}"), width=8,
                   description="Requests being served, per API, summed over replicas."),
        timeseries("Tokens/s",
                   [Target(f"sum({rate('gateway_prompt_tokens_total')})", "prompt"),
                    Target(f"sum({rate('gateway_completion_tokens_total')})", "completion"),
                    Target(f"sum({rate('vllm:generation_tokens_total')})", "engine generation"),
                    Target(f"sum({rate('vllm:prompt_tokens_total')})", "engine prompt")],
                   width=8,
                   description="Prompt and completion tokens per second as billed by the gateway, and as "
                               "counted by vLLM (engine prompt tokens exclude prefix-cache hits only in "
                               "some vLLM versions)."),
        timeseries("Scrape targets up",
                   Target(f'up{{job=~"{"|".join(JOBS)}"}}', "{{job}} {{instance}}"), width=8, max=1,
                   description="1 when Prometheus scraped the target successfully, per target."),
    ).new_row().add(
        timeseries("vLLM requests running / waiting",
                   [Target("sum by (replica) (vllm:num_requests_running)", "running {{replica}}"),
                    Target("sum by (replica) (vllm:num_requests_waiting)", "waiting {{replica}}")],
                   width=8,
                   description="Requests in the engine's running batch and in its queue, per replica."),
        timeseries("vLLM KV cache usage",
                   Target("max by (replica) (vllm:kv_cache_usage_perc)", "{{replica}}"),
                   unit="percentunit", max=1, width=8,
                   description="Share of the KV cache blocks in use, per replica (1 = full: preemptions follow)."),
        timeseries("vLLM preemptions/s",
                   Target(f"sum by (replica) ({rate('vllm:num_preemptions_total')})", "{{replica}}"), width=8,
                   description="Requests preempted by the engine for lack of KV cache, per replica."),
    )
    return dashboard("datanet-gateway-overview", "Datanet Gateway / Overview",
                     "Traffic, latency SLOs, errors, tokens and engine health of the inference gateway.",
                     [TAG, "overview"], grid)


# -- adapters ---------------------------------------------------------------------------------------


def adapters() -> dict[str, Any]:
    hits = f"sum({rate('gateway_adapter_cache_hits_total')})"
    loads = f"sum({rate('gateway_adapter_loads_total')})"
    hit_ratio = f"{hits} / ({hits} + {loads})"
    adapter_requests = rate(f"gateway_requests_total{{{ADAPTER_NOT_BASE}}}")
    grid = Grid().add(
        stat("Adapter requests/s", f"sum({adapter_requests})",
             unit="reqps", decimals=2, description="Requests per second to the selected adapters (base model excluded)."),
        stat("Adapters with traffic",
             f"count(sum by (adapter) ({adapter_requests}) > 0)",
             description="Distinct selected adapters that received requests in the rate window."),
        gauge("Cache hit ratio (now)", hit_ratio,
              thresholds=((None, "red"), (0.5, "orange"), (0.9, "green")),
              description="Requests whose adapter was already resident: hits / (hits + loads)."),
        stat("Adapters resident", "sum(gateway_adapters_resident)",
             description="Adapters loaded in vLLM, summed over replicas."),
        stat("Adapter loads/s", loads, decimals=2, description="Just-in-time adapter loads per second."),
        stat("Adapter evictions/s", f"sum({rate('gateway_adapter_evictions_total')})", decimals=2,
             description="Least recently used adapters evicted per second to make room."),
    ).new_row().add(
        _top_adapters("Requests/s", "gateway_requests_total", unit="reqps",
                      description="The busiest selected adapters at each step; the base model shows as (base model)."),
        _top_adapters("Completion tokens/s", "gateway_completion_tokens_total",
                      description="Generated tokens per second for the selected adapters with the most output."),
    ).new_row().add(
        _top_adapters("Prompt tokens/s", "gateway_prompt_tokens_total",
                      description="Prompt tokens per second for the selected adapters with the most input."),
        timeseries(f"Non-2xx responses/s by adapter (top {TOP})",
                   Target(_base_model_named(
                       f"topk({TOP}, sum by (adapter, status) "
                       f"({rate(f'gateway_requests_total{{{ADAPTER}, {NON_2XX}}}')}))"),
                       "{{adapter}} {{status}}"),
                   unit="reqps",
                   description="Failing requests per adapter and status: 404 unknown, 422 broken adapter, 429 "
                               "overload, 503 engine restarting."),
    ).new_row().add(
        timeseries("Adapter loads and evictions/s",
                   [Target(f"sum by (replica) ({rate('gateway_adapter_loads_total')})", "loads {{replica}}"),
                    Target(f"sum by (replica) ({rate('gateway_adapter_evictions_total')})",
                           "evictions {{replica}}")],
                   width=8,
                   description="Per replica. Evictions close to loads mean the working set does not fit the cache."),
        timeseries("Adapter cache hit ratio",
                   Target(hit_ratio, "hit ratio"), unit="percentunit", max=1, width=8,
                   description="hits / (hits + loads), every replica."),
        timeseries("Adapter load latency",
                   _percentiles("gateway_adapter_load_seconds", 0.5, 0.99), unit="s", width=8,
                   description="Time to fetch, check and load an adapter into vLLM, p50/p99."),
    ).new_row().add(
        timeseries("Adapters resident per replica",
                   Target("sum by (replica) (gateway_adapters_resident)", "{{replica}}"), width=24,
                   description="Adapters held by each replica's LRU (capped by its max_loras / cache size)."),
    )
    variables = [query_variable("adapter", "Adapter", "label_values(gateway_requests_total, adapter)")]
    return dashboard("datanet-gateway-adapters", "Datanet Gateway / Adapters",
                     "Traffic per LoRA adapter and the per-replica adapter cache. The adapter variable filters "
                     "the per-adapter panels only; cache metrics have no adapter label.",
                     [TAG, "adapters"], grid, variables)


# -- attribution and ledger -------------------------------------------------------------------------


def attribution_ledger() -> dict[str, Any]:
    shipped = f"sum({rate('gateway_traces_shipped_total')})"
    failures = f"sum({rate('gateway_trace_send_failures_total')})"
    refused = rate('ledger_traces_ingested_total{result=~"conflict|rejected"}')
    grid = Grid().add(
        stat("Attribution p99", quantile(0.99, "gateway_attribution_seconds"), unit="s",
             description="99th percentile of the time to attribute one response (off the response path)."),
        stat("Attributed fraction (mean)", mean("gateway_attributed_fraction"), unit="percentunit", decimals=1,
             description="Mean share of a response's tokens attributed to contributions."),
        stat("Outbox traces", "sum(gateway_outbox_traces)",
             thresholds=((None, "green"), (1000, "orange"), (10000, "red")),
             description="Traces written durably and waiting to be shipped to the ledger."),
        stat("Oldest outbox trace", "max(gateway_outbox_oldest_age_seconds)", unit="s",
             thresholds=((None, "green"), (60, "orange"), (600, "red")),
             description="Age of the oldest trace not yet acknowledged by the ledger."),
        stat("Traces shipped/s", shipped, decimals=2, description="Traces acknowledged by the ledger per second."),
        stat("Ledger conflicts + rejects/s",
             f"sum({refused})", decimals=2,
             thresholds=((None, "green"), (0.001, "red")),
             description="Traces the ledger refused: same id with different content, or invalid."),
    ).new_row().add(
        timeseries("Attribution latency per request",
                   _percentiles("gateway_attribution_seconds", 0.5, 0.99), unit="s", width=8,
                   description="Time to attribute every token of one response, p50/p99."),
        timeseries("Attribution latency per token",
                   _percentiles("gateway_attribution_per_token_seconds", 0.5, 0.99), unit="s", width=8,
                   description="Attribution time divided by the response's tokens, p50/p99."),
        timeseries("Attributed fraction",
                   [Target(mean("gateway_attributed_fraction"), "mean"),
                    Target(quantile(0.5, "gateway_attributed_fraction"), "median")],
                   unit="percentunit", max=1, width=8,
                   description="Share of a response's tokens attributed to contributions: mean (sum / count) and "
                               "median (from buckets 0.1 .. 1.0, so only 0.1-accurate)."),
    ).new_row().add(
        timeseries("Attribution lag",
                   _percentiles("gateway_attribution_lag_seconds", 0.5, 0.99), unit="s", width=8,
                   description="From a response's end to its trace written (outbox and trace file), p50/p99. "
                               "Bounded by the lag policy's max lag (attribution/service.py)."),
        timeseries("Attribution backlog",
                   [Target("sum by (replica) (gateway_attribution_queue_depth)", "in memory {{replica}}"),
                    Target("sum by (replica) (gateway_attribution_deferred)", "waiting on disk {{replica}}")],
                   width=8,
                   description="Responses held in memory for attribution (at most the queue bound) and responses "
                               "whose attribution waits in the usage log because attribution is behind."),
        timeseries("Responses shed (billed unattributed)/s",
                   Target(f"sum by (replica) ({rate('gateway_attribution_shed_total')})", "shed/s {{replica}}"),
                   width=8,
                   description="Responses whose attribution waited longer than the max lag (or found no room "
                               "without a usage log): billed with every token unattributed."),
    ).new_row().add(
        timeseries("Outbox depth",
                   Target("sum(gateway_outbox_traces)", "traces waiting"), width=8,
                   description="Traces waiting in <state>/outbox/; it grows while the ledger is unreachable."),
        timeseries("Oldest outbox trace age",
                   Target("max(gateway_outbox_oldest_age_seconds)", "oldest"), unit="s", width=8,
                   description="How far behind shipping is."),
        timeseries("Trace shipping",
                   [Target(shipped, "shipped/s"), Target(failures, "send failures/s")], width=8,
                   description="Traces acknowledged per second and failed send attempts per second."),
    ).new_row().add(
        timeseries("Ledger ingested traces/s by result",
                   Target(f"sum by (result) ({rate('ledger_traces_ingested_total')})", "{{result}}"), stack=True,
                   description="accepted: new; duplicate: a repeat with the same content (idempotent); "
                               "conflict: same id, different content; rejected: invalid."),
        timeseries("Ledger ingest batch latency",
                   _percentiles("ledger_ingest_batch_seconds", 0.5, 0.99), unit="s",
                   description="Time to ingest one batch of traces into the journal, p50/p99."),
    ).new_row().add(
        timeseries("Replicas and the ledger",
                   [Target(f"sum by (replica) ({rate('gateway_rate_local_admissions_total')})",
                           "local rate admissions/s {{replica}}"),
                    Target(f"sum by (replica) ({rate('gateway_hold_reports_refused_total')})",
                           "refused holds/s {{replica}}")], width=24,
                   description="Requests admitted on a replica's own rate limits while the ledger was away, and "
                               "request holds the ledger refused (those requests are still billed by their trace)."),
    )
    return dashboard("datanet-gateway-attribution-ledger", "Datanet Gateway / Attribution & ledger",
                     "Per-token attribution cost and coverage, trace shipping through the outbox, ledger ingest.",
                     [TAG, "attribution", "ledger"], grid)


# -- settlement -------------------------------------------------------------------------------------


def settlement() -> dict[str, Any]:
    def amount(state: str) -> str:
        return f'sum(ledger_payout_amount_tokens{{state="{state}"}})'

    gas_rate = f"sum({rate('ledger_settlement_gas_used_total')})"
    grid = Grid().add(
        stat("Payable", amount("payable"), unit="none", decimals=2,
             description="Tokens owed to contributors and not yet in a payout batch."),
        stat("Pending", amount("pending"), unit="none", decimals=2,
             description="Tokens in payout batches not yet confirmed on-chain."),
        stat("Paid", amount("paid"), unit="none", decimals=2, description="Tokens paid out on-chain in total."),
        stat("Batches in progress", 'sum(ledger_payout_batches{state=~"planned|signed|sent"})',
             description="Payout batches planned, signed or sent but not yet confirmed."),
        stat("Voided batches", 'sum(ledger_payout_batches{state="voided"})',
             thresholds=((None, "green"), (1, "orange")),
             description="Batches abandoned (their balances return to payable)."),
        stat("Gas used (total)", "sum(ledger_settlement_gas_used_total)", unit="short",
             description="Gas spent by settlement transactions since the ledger's counter started."),
    ).new_row().add(
        timeseries("Payout batches by state",
                   Target("sum by (state) (ledger_payout_batches)", "{{state}}"),
                   description="planned → signed → sent → confirmed → paid, or voided."),
        timeseries("Payout amounts (tokens)",
                   Target("sum by (state) (ledger_payout_amount_tokens)", "{{state}}"), unit="none",
                   description="Whole tokens payable, pending in batches, and paid."),
    ).new_row().add(
        timeseries("Settlement gas used/s", Target(gas_rate, "gas/s"),
                   description="Gas spent per second by settlement transactions."),
        timeseries("Settlement gas used (total)", Target("sum(ledger_settlement_gas_used_total)", "gas"),
                   description="Cumulative gas (resets when the ledger restarts)."),
    )
    return dashboard("datanet-gateway-settlement", "Datanet Gateway / Settlement",
                     "Payout batches and amounts, and the gas spent settling them on-chain.",
                     [TAG, "settlement", "ledger"], grid)


DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "datanet-gateway-overview": overview,
    "datanet-gateway-adapters": adapters,
    "datanet-gateway-attribution-ledger": attribution_ledger,
    "datanet-gateway-settlement": settlement,
}


def all_dashboards() -> list[dict[str, Any]]:
    return [build() for build in DASHBOARDS.values()]


def variable_values(board: dict[str, Any]) -> dict[str, str]:
    """Plain-PromQL stand-ins for a dashboard's variables: built-ins, then "All" of each variable."""
    values = dict(BUILTIN_VALUES)
    for variable in board["templating"]["list"]:
        values[variable["name"]] = variable["allValue"] if variable.get("includeAll") else variable["current"]["value"]
    return values


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every target, variables expanded to plain PromQL."""
    queries = []
    for board in all_dashboards():
        values = variable_values(board)
        for panel in board["panels"]:
            for target in panel["targets"]:
                queries.append((board["uid"], panel["title"], expand(target["expr"], values)))
    return queries
