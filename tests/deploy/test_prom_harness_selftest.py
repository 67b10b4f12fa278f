"""Self-test of prom_harness (NOT the end-to-end test): a real `prometheus` scrapes a stand-in exporter
built from ZoMetrics and fed synthetic values, then every dashboard panel query and every recording rule
is evaluated and must return data. The end-to-end test will point the same harness at a live zoserve."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from deploy_paths import DASHBOARD_PATHS, PROMETHEUS_DIR
from prom_harness import PromHarness, PromHarnessError, dashboard_queries, substitute
from service.metrics import ADAPTER_CLASSES, ZoMetrics

SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval is at least 4 scrape intervals


def feed(metrics: ZoMetrics, tick: int) -> None:
    """One round of synthetic activity: two adapters training, user traffic of every class."""
    for adapter in ("sst2-a", "sst2-b"):
        metrics.observe_zo_step(adapter, duration_s=0.05 + 0.01 * (tick % 7), num_probe_sequences=32,
                                num_scored_tokens=900, loss=0.7 - 0.001 * tick, projected_gradient_abs=2.0)
        metrics.count_version_committed(adapter)
        metrics.set_eval_accuracy(adapter, min(1.0, 0.5 + 0.002 * tick))
    for adapter_class in ADAPTER_CLASSES:
        metrics.observe_user_request(adapter_class, duration_s=0.2 + 0.01 * (tick % 5), ttft_s=0.03)
    metrics.observe_ttft_stages({"request_in": 0.0005, "handler": 0.001, "to_engine": 0.003 + 0.001 * (tick % 3), "engine_wait": 0.0001,
                                 "first_forward": 0.006, "to_service": 0.0015})
    metrics.observe_http_request("/v1/completions", 200)
    metrics.observe_http_request("/v1/chat/completions", 500 if tick % 10 == 0 else 200)
    metrics.count_tokens("serve", 150)
    metrics.count_tokens("train", 900)
    metrics.set_jobs_by_state({"running": 2, "pending": 1})
    metrics.set_cosched(train_budget_tokens=2048 + tick % 3, user_latency_s=0.15, target_latency_s=0.25)
    metrics.set_cosched_detail(budget_reason="hold_band", job_token_shares={"sst2-a": 1 / 3, "sst2-b": 2 / 3})
    metrics.set_lora_slots(probe=4, serving=2, pinned_version=1, free=1)
    metrics.set_queue_depths(user_waiting=1, user_running=2, zo_waiting=8, zo_inflight=32)


@pytest.fixture()
def stand_in_exporter() -> Iterator[str]:
    metrics = ZoMetrics(CollectorRegistry())
    feed(metrics, 0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = metrics.exposition()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", metrics.content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stop = threading.Event()

    def run_feeder() -> None:
        for tick in itertools.count(1):
            if stop.wait(0.1):
                return
            feed(metrics, tick)

    threads = [threading.Thread(target=server.serve_forever, daemon=True),
               threading.Thread(target=run_feeder, daemon=True)]
    for t in threads:
        t.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_substitute_grafana_variables() -> None:
    expr = 'rate(x{a=~"$adapter",c=~"${adapter_class}",d="[[dc]]"}[$__rate_interval])'
    assert substitute(expr, {"adapter": ".*", "adapter_class": "base", "dc": "x"}, rate_interval="1m") == (
        'rate(x{a=~".*",c=~"base",d="x"}[1m])'
    )
    with pytest.raises(PromHarnessError, match="missing"):
        substitute("x{a=~\"$missing\"}", {}, rate_interval="1m")


def test_harness_evaluates_every_panel_query_against_a_stand_in_exporter(
    stand_in_exporter: str, tmp_path: Path
) -> None:
    with PromHarness([stand_in_exporter], workdir=tmp_path / "prom", scrape_interval=SCRAPE_INTERVAL,
                     rule_files=[PROMETHEUS_DIR / "rules.yml"]) as prom:
        prom.wait_for(prom.targets_up, 20, "stand-in exporter scraped")
        results = prom.evaluate_dashboards(DASHBOARD_PATHS, rate_interval=RATE_INTERVAL, timeout_s=20)
        assert len(results) == len(dashboard_queries(DASHBOARD_PATHS)) > 20
        for query, result in results.items():
            assert result.series, f"{query.dashboard}/{query.panel}: no data for {result.expr}"
            assert not all(math.isnan(v) for v in result.values), f"{query.panel}: all NaN for {result.expr}"

        # Spot-check values that the synthetic feed pins down.
        p99 = prom.query(f'histogram_quantile(0.99, sum by (le) (rate(zoserve_request_ttft_seconds_bucket'
                         f'{{adapter_class="base"}}[{RATE_INTERVAL}])))')
        assert 0.025 <= p99.values[0] <= 0.05  # every TTFT is 30 ms: inside the (25 ms, 50 ms] bucket
        slots = prom.query("sum(zoserve_lora_slots)")
        assert slots.values == [8.0]

        # Recording rules load and evaluate (5m windows have data once two scrapes are in).
        for record in ("adapter:zoserve_zo_steps:rate5m", "adapter_class:zoserve_request_ttft_seconds:p99_rate5m",
                       "zoserve_engine_tokens:train_share_rate5m"):
            prom.wait_for_data(record, timeout_s=20)
        assert all(health in ("ok", "unknown") for _, health, _ in prom.rule_health())
        assert [err for _, _, err in prom.rule_health() if err] == []
