"""The dashboards: stable uids, sound panels and layout, and queries that name only known metrics."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring.dashboards import DASHBOARDS, KNOWN_METRICS, all_dashboards, panel_queries, series_names
from monitoring.panels import GRID_COLUMNS, Grid, Target, expand, stat, timeseries

EXPECTED_UIDS = {
    "datanet-gateway-overview",
    "datanet-gateway-adapters",
    "datanet-gateway-attribution-ledger",
    "datanet-gateway-settlement",
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}
BRACKETS = {")": "(", "]": "[", "}": "{"}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expr: identifiers that are not functions, keywords, labels or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group().lower() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def balanced(expr: str) -> bool:
    stack: list[str] = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in BRACKETS and (not stack or stack.pop() != BRACKETS[char]):
            return False
    return not stack and expr.count('"') % 2 == 0


def panels() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(board, panel) for board in all_dashboards() for panel in board["panels"]]


def test_the_four_dashboards_exist_with_unique_stable_uids() -> None:
    boards = all_dashboards()
    uids = [board["uid"] for board in boards]
    assert set(uids) == EXPECTED_UIDS == set(DASHBOARDS)
    assert len(uids) == len(set(uids))
    assert [b["uid"] for b in all_dashboards()] == uids  # built again: same uids
    for board in boards:
        assert len(board["uid"]) <= 40  # Grafana's limit
        assert board["title"] and "datanet-gateway" in board["tags"]
        assert board["schemaVersion"] == 39
        assert board["time"] == {"from": "now-1h", "to": "now"}
        assert board["refresh"] == "10s"
        assert "id" not in board  # provisioned dashboards are matched by uid


def test_building_twice_gives_identical_json() -> None:
    assert json.dumps(all_dashboards(), sort_keys=True) == json.dumps(all_dashboards(), sort_keys=True)


@pytest.mark.parametrize("uid", sorted(EXPECTED_UIDS))
def test_panels_have_unique_ids_and_do_not_overlap(uid: str) -> None:
    board = DASHBOARDS[uid]()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    boxes = [panel["gridPos"] for panel in board["panels"]]
    for box in boxes:
        assert box["x"] >= 0 and box["y"] >= 0 and box["w"] >= 1 and box["h"] >= 1
        assert box["x"] + box["w"] <= GRID_COLUMNS
    for a, b in itertools.combinations(boxes, 2):
        overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                   and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
        assert not overlap, (uid, a, b)


def test_every_panel_queries_the_prometheus_datasource() -> None:
    for board, panel in panels():
        where = (board["uid"], panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
        assert panel["targets"], where
        assert panel["title"], where
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
            assert target["expr"].strip(), where


def test_panel_titles_are_unique_within_a_dashboard() -> None:
    for board in all_dashboards():
        titles = [panel["title"] for panel in board["panels"]]
        assert len(titles) == len(set(titles)), board["uid"]


def test_panel_queries_cover_every_target_with_variables_expanded() -> None:
    queries = panel_queries()
    assert len(queries) == sum(len(panel["targets"]) for _, panel in panels())
    for uid, title, expr in queries:
        assert uid in EXPECTED_UIDS and title
        assert "$" not in expr, (uid, title, expr)
    assert any('adapter=~".*"' in expr for _, _, expr in queries)
    assert any("[1m]" in expr for _, _, expr in queries)


@pytest.mark.parametrize(("uid", "title", "expr"), panel_queries())
def test_expr_is_balanced_and_names_only_known_metrics(uid: str, title: str, expr: str) -> None:
    assert balanced(expr), expr
    names = metric_names(expr)
    assert names, expr
    assert names <= series_names(), names - series_names()
    # A panel whose metric is missing must show "no data", not a made-up zero.
    assert "vector(" not in expr and "absent(" not in expr
    for name in re.findall(r"\b(?:rate|increase|irate)\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert KNOWN_METRICS.get(name) == "counter" or KNOWN_METRICS.get(base) == "histogram", (name, expr)
    if "_bucket" in expr:
        assert "histogram_quantile(" in expr and "by (le" in expr, expr


def test_every_known_metric_is_on_some_dashboard() -> None:
    used = set().union(*(metric_names(expr) for _, _, expr in panel_queries()))
    for name, kind in KNOWN_METRICS.items():
        exposed = {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        assert used & exposed, name


def test_adapter_variable_is_a_multi_select_regex() -> None:
    board = DASHBOARDS["datanet-gateway-adapters"]()
    (variable,) = board["templating"]["list"]
    assert (variable["name"], variable["allValue"], variable["multi"]) == ("adapter", ".*", True)
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"] if "$adapter" in t["expr"]]
    assert exprs and all('adapter=~"$adapter"' in expr for expr in exprs)


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (le) (rate(a_bucket{x="y(z"}[$__rate_interval]))') == {"a_bucket"}
    assert metric_names("max by (replica) (vllm:kv_cache_usage_perc) / up") == {"vllm:kv_cache_usage_perc", "up"}
    assert metric_names('label_replace(topk(10, b), "adapter", "(base)", "adapter", "")') == {"b"}
    assert not balanced("sum(rate(x[1m])")


def test_expand_replaces_variables_and_makes_equality_matchers_regex() -> None:
    values = {"__rate_interval": "1m", "adapter": ".*"}
    assert expand('rate(x{adapter="$adapter"}[$__rate_interval])', values) == 'rate(x{adapter=~".*"}[1m])'
    assert expand('x{adapter=~"${adapter}"}', values) == 'x{adapter=~".*"}'
    assert expand('x{adapter!="$adapter"}', values) == 'x{adapter!=".*"}'
    with pytest.raises(ValueError, match="unexpanded"):
        expand("x{a=~\"$unknown\"}", values)


def test_grid_starts_a_new_row_below_the_tallest_panel() -> None:
    grid = Grid().add(stat("a", "up", width=4, height=4), timeseries("b", "up", width=20, height=9),
                      stat("c", "up", width=6, height=3))
    assert [p["gridPos"] for p in grid.panels] == [
        {"x": 0, "y": 0, "w": 4, "h": 4}, {"x": 4, "y": 0, "w": 20, "h": 9}, {"x": 0, "y": 9, "w": 6, "h": 3}]
    assert [p["id"] for p in grid.panels] == [1, 2, 3]
    with pytest.raises(ValueError):
        timeseries("empty", [])
    assert Target("up").to_json("A")["legendFormat"] == "__auto"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_expr(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:check_{i}", "expr": expr} for i, (_, _, expr) in enumerate(panel_queries())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
