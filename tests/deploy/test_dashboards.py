"""Grafana dashboards: one canonical copy, datasource variable, $__rate_interval, quantiles over rates, and
only metrics and labels the ZoMetrics catalogue exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from deploy_paths import DASHBOARD_PATHS, DASHBOARDS_DIR, DEPLOY_DASHBOARDS_DIR, REPO
from prom_harness import dashboard_queries
from promql_refs import TARGET_LABELS, family_of, label_refs, metric_refs
from service.metrics import METRIC_NAMES

IDS = [p.stem for p in DASHBOARD_PATHS]
QUERIES = dashboard_queries(DASHBOARD_PATHS)
QUERY_IDS = [f"{q.dashboard}/{q.panel}/{q.ref_id}" for q in QUERIES]


def test_three_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARD_PATHS} == {"zoserve-training.json", "zoserve-serving.json",
                                                 "zoserve-engine.json"}


def test_deploy_copy_is_byte_identical_to_chart_dashboards() -> None:
    """helm/zoserve/dashboards is canonical (Helm's .Files cannot read outside the chart)."""
    copies = sorted(DEPLOY_DASHBOARDS_DIR.glob("*.json"))
    assert [p.name for p in copies] == [p.name for p in DASHBOARD_PATHS], "cp helm/zoserve/dashboards/*.json deploy/grafana/dashboards/"
    for canonical, copy in zip(DASHBOARD_PATHS, copies):
        assert copy.read_bytes() == canonical.read_bytes(), (
            f"{copy} differs from {canonical}: edit the chart's copy, then "
            "cp helm/zoserve/dashboards/*.json deploy/grafana/dashboards/"
        )


def _walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


@pytest.mark.parametrize("path", DASHBOARD_PATHS, ids=IDS)
def test_datasource_is_a_template_variable_never_a_uid(path: Path) -> None:
    board = json.loads(path.read_text())
    variables = board["templating"]["list"]
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= variables[0].items()
    assert "__inputs" not in board
    datasources = [n["datasource"] for n in _walk(board) if isinstance(n, dict) and "datasource" in n]
    assert datasources
    for ds in datasources:
        assert ds == {"type": "prometheus", "uid": "${datasource}"}, ds
    for panel in (n for n in _walk(board) if isinstance(n, dict) and "targets" in n):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize("path", DASHBOARD_PATHS, ids=IDS)
def test_panel_ids_unique_and_layout_fits(path: Path) -> None:
    board = json.loads(path.read_text())
    panels = [n for n in _walk(board["panels"]) if isinstance(n, dict) and "gridPos" in n]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


@pytest.mark.parametrize("query", QUERIES, ids=QUERY_IDS)
def test_ranges_use_rate_interval(query) -> None:
    ranges = re.findall(r"\[([^\]]+)\]", query.expr)
    assert all(r == "$__rate_interval" for r in ranges), query.expr


@pytest.mark.parametrize("query", QUERIES, ids=QUERY_IDS)
def test_metrics_exist_in_catalogue(query) -> None:
    refs = metric_refs(query.expr)
    assert refs, f"no zoserve metric in {query.expr}"
    for ref in refs:
        assert family_of(ref) is not None, f"{ref} is not exported by ZoMetrics ({query.panel})"


@pytest.mark.parametrize("query", QUERIES, ids=QUERY_IDS)
def test_labels_exist_on_referenced_metrics(query) -> None:
    known = set(TARGET_LABELS)
    for ref in metric_refs(query.expr):
        known.update(METRIC_NAMES[family_of(ref)][1])
    assert label_refs(query.expr) <= known, query.expr


@pytest.mark.parametrize("query", QUERIES, ids=QUERY_IDS)
def test_counters_and_histograms_only_through_rate(query) -> None:
    """No 'average since start': cumulative series are always rated over $__rate_interval, and histograms
    are read as histogram_quantile(q, sum by (le, ...) (rate(..._bucket[$__rate_interval])))."""
    for ref in set(metric_refs(query.expr)):
        family = family_of(ref)
        kind = METRIC_NAMES[family][0]
        if kind == "gauge":
            continue
        occurrences = len(re.findall(rf"\b{ref}\b", query.expr))
        rated = len(re.findall(rf"rate\({ref}(\{{[^}}]*\}})?\[\$__rate_interval\]\)", query.expr))
        assert rated == occurrences, f"{ref} used outside rate(...[$__rate_interval]): {query.expr}"
        if ref.endswith("_bucket"):
            pattern = (rf"histogram_quantile\(0\.\d+, sum by \(le(, \w+)*\) "
                       rf"\(rate\({ref}(\{{[^}}]*\}})?\[\$__rate_interval\]\)\)\)")
            assert re.search(pattern, query.expr), query.expr
        elif kind == "histogram":
            assert ref.endswith(("_count", "_sum")), query.expr


def test_every_histogram_is_plotted_as_quantiles() -> None:
    histograms = {n for n, (kind, _) in METRIC_NAMES.items() if kind == "histogram"}
    plotted = {family_of(r) for q in QUERIES for r in metric_refs(q.expr) if r.endswith("_bucket")}
    assert plotted == histograms


def test_key_panels_present() -> None:
    exprs = {q.dashboard: [] for q in QUERIES}
    for q in QUERIES:
        exprs[q.dashboard].append(q.expr)
    training, serving, engine = (" ".join(exprs[u]) for u in ("zoserve-training", "zoserve-serving", "zoserve-engine"))
    assert "rate(zoserve_zo_steps_total" in training and "zoserve_zo_loss_nats" in training
    assert "zoserve_eval_accuracy_ratio" in training and "zoserve_engine_tokens_total" in training
    assert "histogram_quantile(0.99" in serving and "histogram_quantile(0.5" in serving
    assert "zoserve_http_requests_total" in serving
    for name in ("zoserve_lora_slots", "zoserve_queue_requests", "zoserve_cosched_train_budget_tokens",
                 "zoserve_cosched_user_latency_seconds", "zoserve_cosched_user_latency_target_seconds"):
        assert name in engine


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yaml").read_text())
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/zoserve.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
    assert DASHBOARDS_DIR.is_dir()
