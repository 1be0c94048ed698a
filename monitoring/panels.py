"""Small builders for Grafana's dashboard JSON model (schema 39): targets, panels, a grid, variables.

Everything here returns plain dicts (or frozen dataclasses that render to dicts), so a dashboard is
data that can be diffed, tested and written to a file. Panels are laid out by `Grid`, which flows
them left to right in rows of 24 columns and never lets two panels overlap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 39
GRID_COLUMNS = 24
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "prometheus"}

RATE = "$__rate_interval"
"""Rate window: Grafana picks max(4 x scrape interval, step + scrape interval) for each query."""

PanelType = Literal["timeseries", "stat", "gauge"]


# -- PromQL helpers ---------------------------------------------------------------------------------


def rate(series: str, window: str = RATE) -> str:
    """`rate(series[window])`; `series` may carry a matcher, e.g. `x_total{api="grpc"}`."""
    return f"rate({series}[{window}])"


def quantile(q: float, histogram: str, matcher: str = "", by: Sequence[str] = ()) -> str:
    """p-quantile of a histogram over the rate window, summed over every series (and replica)."""
    labels = ", ".join(["le", *by])
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(f'{histogram}_bucket{matcher}')}))"


def mean(histogram: str, matcher: str = "") -> str:
    """Mean of a histogram's observations over the rate window (sum / count)."""
    return f"sum({rate(f'{histogram}_sum{matcher}')}) / sum({rate(f'{histogram}_count{matcher}')})"


# -- targets and panels ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel; `legend` is Grafana's legend format (`{{label}}` placeholders)."""

    expr: str
    legend: str = ""

    def to_json(self, ref_id: str) -> dict[str, Any]:
        return {
            "datasource": dict(DATASOURCE),
            "editorMode": "code",
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "range": True,
            "refId": ref_id,
        }


@dataclass(frozen=True)
class Panel:
    """A panel before layout: `Grid` gives it an id and a position."""

    type: PanelType
    title: str
    targets: tuple[Target, ...]
    description: str = ""
    unit: str = "short"
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    decimals: int | None = None
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),)
    options: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"panel {self.title!r} has no targets")
        if not 1 <= self.width <= GRID_COLUMNS or self.height < 1:
            raise ValueError(f"panel {self.title!r} has an impossible size {self.width}x{self.height}")

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {
            "color": {"mode": "palette-classic" if self.type == "timeseries" else "thresholds"},
            "custom": dict(self.custom),
            "mappings": [],
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": color, "value": value} for value, color in self.thresholds],
            },
            "unit": self.unit,
        }
        for key in ("min", "max", "decimals"):
            if getattr(self, key) is not None:
                defaults[key] = getattr(self, key)
        return {
            "datasource": dict(DATASOURCE),
            "description": self.description,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "id": panel_id,
            "options": dict(self.options),
            "targets": [target.to_json(chr(ord("A") + i)) for i, target in enumerate(self.targets)],
            "title": self.title,
            "type": self.type,
        }


def _targets(targets: Target | str | Iterable[Target | str]) -> tuple[Target, ...]:
    if isinstance(targets, (Target, str)):
        targets = [targets]
    return tuple(t if isinstance(t, Target) else Target(t) for t in targets)


def timeseries(
    title: str,
    targets: Target | str | Iterable[Target | str],
    *,
    unit: str = "short",
    description: str = "",
    width: int = 12,
    height: int = 8,
    stack: bool = False,
    min: float | None = 0,
    max: float | None = None,
) -> Panel:
    """A line graph; `stack` stacks the series (for parts of a whole, e.g. requests by status)."""
    custom = {
        "drawStyle": "line",
        "fillOpacity": 20 if stack else 5,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    options = {
        "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return Panel("timeseries", title, _targets(targets), description, unit, width, height, min, max,
                 options=options, custom=custom)


def _reduce_options() -> dict[str, Any]:
    return {"calcs": ["lastNotNull"], "fields": "", "values": False}


def stat(
    title: str,
    targets: Target | str | Iterable[Target | str],
    *,
    unit: str = "short",
    description: str = "",
    width: int = 4,
    height: int = 4,
    decimals: int | None = None,
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),),
) -> Panel:
    """A big number (the last value) with a sparkline."""
    options = {
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": _reduce_options(),
        "textMode": "auto",
    }
    return Panel("stat", title, _targets(targets), description, unit, width, height, None, None, decimals,
                 thresholds, options=options)


def gauge(
    title: str,
    targets: Target | str | Iterable[Target | str],
    *,
    unit: str = "percentunit",
    description: str = "",
    width: int = 4,
    height: int = 4,
    min: float = 0,
    max: float = 1,
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),),
) -> Panel:
    """A dial between `min` and `max` (a fraction by default)."""
    options = {
        "orientation": "auto",
        "reduceOptions": _reduce_options(),
        "showThresholdLabels": False,
        "showThresholdMarkers": True,
    }
    return Panel("gauge", title, _targets(targets), description, unit, width, height, min, max,
                 thresholds=thresholds, options=options)


# -- layout -----------------------------------------------------------------------------------------


class Grid:
    """Places panels left to right; a panel that does not fit in the row starts a new one.

    A new row starts below the tallest panel of the previous row, so panels never overlap.
    """

    def __init__(self) -> None:
        self._panels: list[dict[str, Any]] = []
        self._x = 0
        self._row_y = 0
        self._row_bottom = 0

    def add(self, *panels: Panel) -> Grid:
        for panel in panels:
            if self._x + panel.width > GRID_COLUMNS:
                self.new_row()
            self._panels.append(panel.to_json(len(self._panels) + 1, self._x, self._row_y))
            self._x += panel.width
            self._row_bottom = max(self._row_bottom, self._row_y + panel.height)
        return self

    def new_row(self) -> Grid:
        """Start the next panel at the left edge, below everything placed so far."""
        self._x, self._row_y = 0, self._row_bottom
        return self

    @property
    def panels(self) -> list[dict[str, Any]]:
        return list(self._panels)


# -- variables and dashboards -----------------------------------------------------------------------


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-select variable over `label_values(...)`; "All" is the regex `.*`.

    Use it in a regex matcher: `{adapter=~"$adapter"}` (Grafana joins several values as `a|b`).
    """
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": dict(DATASOURCE),
        "definition": query,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    tags: Sequence[str],
    grid: Grid,
    variables: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A whole dashboard: last hour, refreshed every 10 s, linked to the others by the shared tag."""
    return {
        "annotations": {"list": [{
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [{
            "asDropdown": True,
            "icon": "external link",
            "includeVars": False,
            "keepTime": True,
            "tags": [tags[0]],
            "targetBlank": False,
            "title": "Dashboards",
            "type": "dashboards",
        }],
        "panels": grid.panels,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": list(tags),
        "templating": {"list": list(variables)},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
    }


# -- expanding Grafana variables to plain PromQL ----------------------------------------------------

BUILTIN_VALUES: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}


def expand(expr: str, values: dict[str, str]) -> str:
    """Replace `$name` / `${name}` by `values[name]`; raise if a `$` is left over.

    A variable used with an equality matcher (`label="$name"`) becomes a regex matcher, so a
    regex value such as `.*` keeps its meaning.
    """
    for name in sorted(values, key=len, reverse=True):
        for ref in (f"${{{name}}}", f"${name}"):
            expr = re.sub(rf'(\w+)\s*(?<![=!])=\s*"{re.escape(ref)}"', rf'\1=~"{ref}"', expr)
            expr = re.sub(re.escape(ref) + r"(?!\w)", lambda _: values[name], expr)
    if "$" in expr:
        raise ValueError(f"unexpanded variable in {expr!r}")
    return expr
