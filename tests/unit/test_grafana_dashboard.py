"""deploy/grafana/afd-dashboard.json queries only series the router exports.

Every PromQL expression of the dashboard (panel targets and template variables) is reduced to the metric
names it reads, and each must be a series name a RouterMetrics registry produces: a gauge's name, a
counter's `_total`, a histogram's `_bucket`/`_sum`/`_count`. A renamed metric, a typo or a panel over a
metric that was never added fails here instead of showing "No data" in Grafana.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "afd-dashboard.json"
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def exported_series() -> set[str]:
    """Series names a router's /metrics can carry (families exist in the registry even before a sample)."""
    names = set()
    for family in RouterMetrics("m").registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names read by a PromQL expression (functions, keywords, labels and Grafana variables removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals: label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ([5m], [$__rate_interval])
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables outside selectors
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group()
        if name in _KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue  # a function or aggregation call, or a keyword
        names.add(name)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            inner = re.fullmatch(r"label_values\((.*?)(?:,\s*\w+)?\)", query)
            found.append((f"variable {variable['name']!r}", inner.group(1) if inner else query))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_every_dashboard_query_reads_only_exported_series(dashboard):
    exported = exported_series()
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 20
    unknown = {(where, name) for where, expr in expressions for name in metric_names(expr) if name not in exported}
    assert not unknown, f"the dashboard reads series the router does not export: {sorted(unknown)}"
    read = {name for _, expr in expressions for name in metric_names(expr)}
    # What the issue asks the dashboard to show, each by the series behind it.
    for needed in (
        "vllm:request_success_total",  # request rates
        "vllm:time_to_first_token_seconds_bucket",  # TTFT histogram
        "vllm:inter_token_latency_seconds_bucket",  # ITL histogram
        "vllm:kv_cache_usage_perc",
        "afd:ffn_busy_fraction",
        "afd:layer_activation_bytes_total",  # A<->F bytes per layer
        "afd:layer_round_trip_seconds_total",  # A<->F latency per layer
        "afd:expert_tokens_total",  # expert load
    ):
        assert needed in read, needed


def test_the_dashboard_is_importable_grafana_json(dashboard):
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "model_name"}
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"]), panel["title"]


def test_the_name_check_catches_a_wrong_name_and_ignores_labels_and_functions():
    expr = (
        'histogram_quantile(0.99, sum by (le, node_id) (rate(vllm:time_to_first_tokens_bucket{model_name=~"$m"}'
        "[$__rate_interval]))) / on (le) group_left sum(afd:nodes) > bool 0"
    )
    assert metric_names(expr) == {"vllm:time_to_first_tokens_bucket", "afd:nodes"}
    assert "vllm:time_to_first_tokens_bucket" not in exported_series()  # the misspelling is caught
    assert "vllm:time_to_first_token_seconds_bucket" in exported_series()
    assert "vllm:num_requests_running" in exported_series() and "vllm:prompt_tokens_total" in exported_series()


def test_exported_series_are_the_names_a_scrape_shows():
    metrics = RouterMetrics("m")
    metrics.ttft.labels("m").observe(0.05)
    metrics.layer_activation_bytes.labels("0", "attention_to_ffn").inc(10)
    metrics.ffn_busy.labels("ffn-0").set(0.5)
    scraped = {
        line.split("{")[0].split(" ")[0]
        for line in metrics.render().decode().splitlines()
        if line and not line.startswith("#") and not line.split("{")[0].split(" ")[0].endswith("_created")
    }
    assert {"vllm:time_to_first_token_seconds_bucket", "afd:layer_activation_bytes_total"} <= scraped
    assert scraped <= exported_series()
