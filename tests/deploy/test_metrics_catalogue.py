"""service.metrics: the catalogue's names, labels, exposition (checked by promtool) and typed methods."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from deploy_paths import run_promtool
from service.metrics import (
    ADAPTER_CLASSES,
    METRIC_NAMES,
    ZoMetrics,
    check_metric_names,
    registered_families,
)


def fed_metrics() -> ZoMetrics:
    """A catalogue with every series populated."""
    m = ZoMetrics(CollectorRegistry())
    m.observe_zo_step("sst2-lora", duration_s=0.4, num_probe_sequences=64, num_scored_tokens=2048, loss=0.61,
                      projected_gradient_abs=3.2)
    m.count_version_committed("sst2-lora")
    m.set_eval_accuracy("sst2-lora", 0.81)
    m.count_tokens("serve", 120)
    m.count_tokens("train", 2048)
    m.set_jobs_by_state({"running": 1, "pending": 2})
    m.observe_http_request("/v1/completions", 200)
    m.observe_http_request("/v1/jobs/{job_id}", 404)
    for adapter_class in ADAPTER_CLASSES:
        m.observe_user_request(adapter_class, duration_s=0.3, ttft_s=0.04)
    m.observe_ttft_stages({"request_in": 0.0005, "handler": 0.001, "to_engine": 0.002, "engine_wait": 0.004, "first_forward": 0.005,
                           "to_service": 0.001})
    m.set_cosched(train_budget_tokens=4096, user_latency_s=0.12, target_latency_s=0.2)
    m.set_cosched_detail(budget_reason="hold_band", job_token_shares={"sst2-lora": 0.4, "other": 0.6})
    m.set_lora_slots(probe=4, serving=2, pinned_version=1, free=1)
    m.set_queue_depths(user_waiting=1, user_running=3, zo_waiting=10, zo_inflight=32)
    return m


def test_registry_matches_catalogue_and_names_follow_convention() -> None:
    families = registered_families(fed_metrics().registry)
    assert families == {name: kind for name, (kind, _) in METRIC_NAMES.items()}
    assert check_metric_names(families) == []


def test_exposition_passes_promtool_check_metrics() -> None:
    m = fed_metrics()
    result = run_promtool("check", "metrics", stdin=m.exposition())
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert m.content_type.startswith("text/plain")


def test_exposed_labels_match_catalogue() -> None:
    m = fed_metrics()
    for family in m.registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        expected = set(METRIC_NAMES[name][1])
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            assert set(sample.labels) - {"le"} == expected, sample


@pytest.mark.parametrize(
    ("name", "kind", "problem"),
    [
        ("zoserve_zo_steps", "counter", "must end in _total"),
        ("zoserve_loss_total", "gauge", "only counters"),
        ("zoserve_ttft_milliseconds", "histogram", "base units"),
        ("zoserve_queue_depth", "gauge", "unit 'depth'"),
        ("vllm_zo_steps_total", "counter", "zoserve_<noun>_<unit>"),
        ("zoserve_ZoSteps_total", "counter", "snake_case"),
        ("zoserve_steps_total", "counter", "noun and a unit"),
    ],
)
def test_check_metric_names_reports_violations(name: str, kind: str, problem: str) -> None:
    problems = check_metric_names({name: kind})
    assert any(problem in p for p in problems), problems


def test_each_app_gets_its_own_registry() -> None:
    a, b = ZoMetrics(CollectorRegistry()), ZoMetrics(CollectorRegistry())
    a.observe_zo_step("x", duration_s=0.1, num_probe_sequences=2, num_scored_tokens=10, loss=1.0)
    assert a.registry.get_sample_value("zoserve_zo_steps_total", {"adapter": "x"}) == 1.0
    assert b.registry.get_sample_value("zoserve_zo_steps_total", {"adapter": "x"}) is None


def test_fixed_enum_series_exist_from_the_start() -> None:
    reg = ZoMetrics(CollectorRegistry()).registry
    assert reg.get_sample_value("zoserve_lora_slots", {"use": "free"}) == 0.0
    assert reg.get_sample_value("zoserve_queue_requests", {"queue": "zo_inflight"}) == 0.0
    assert reg.get_sample_value("zoserve_training_jobs", {"state": "running"}) == 0.0
    assert reg.get_sample_value("zoserve_engine_tokens_total", {"class": "train"}) == 0.0


def test_jobs_snapshot_resets_missing_states() -> None:
    m = ZoMetrics(CollectorRegistry())
    m.set_jobs_by_state({"running": 2})
    m.set_jobs_by_state({"succeeded": 1})
    assert m.registry.get_sample_value("zoserve_training_jobs", {"state": "running"}) == 0.0
    assert m.registry.get_sample_value("zoserve_training_jobs", {"state": "succeeded"}) == 1.0


def test_unknown_routes_collapse_to_other_and_codes_to_classes() -> None:
    m = ZoMetrics(CollectorRegistry())
    m.observe_http_request("/v1/adapters/some-name/../../etc", 404)
    m.observe_http_request("/v1/completions", 503)
    assert m.registry.get_sample_value("zoserve_http_requests_total", {"route": "other", "code_class": "4xx"}) == 1
    assert m.registry.get_sample_value(
        "zoserve_http_requests_total", {"route": "/v1/completions", "code_class": "5xx"}) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.count_tokens("probe", 1),
        lambda m: m.count_tokens("train", -1),
        lambda m: m.observe_user_request("sst2@3", duration_s=0.1),
        lambda m: m.observe_ttft_stages({"queueing": 0.1}),
        lambda m: m.set_jobs_by_state({"exploded": 1}),
        lambda m: m.set_eval_accuracy("a", 1.5),
        lambda m: m.observe_http_request("/v1/models", 42),
    ],
)
def test_out_of_range_label_values_are_rejected(call) -> None:
    with pytest.raises(ValueError):
        call(ZoMetrics(CollectorRegistry()))


def test_end_training_and_forget_adapter_drop_series() -> None:
    m = fed_metrics()
    m.end_training("sst2-lora")
    assert m.registry.get_sample_value("zoserve_zo_loss_nats", {"adapter": "sst2-lora"}) is None
    assert m.registry.get_sample_value("zoserve_zo_steps_total", {"adapter": "sst2-lora"}) == 1.0
    m.forget_adapter("sst2-lora")
    assert m.registry.get_sample_value("zoserve_zo_steps_total", {"adapter": "sst2-lora"}) is None
    m.forget_adapter("never-seen")  # idempotent


def test_cosched_detail_marks_one_reason_and_drops_ended_jobs() -> None:
    m = fed_metrics()
    text = m.exposition().decode()
    assert 'zoserve_cosched_budget_reason_info{reason="hold_band"} 1.0' in text
    assert 'zoserve_cosched_budget_reason_info{reason="clamp_users_waiting"} 0.0' in text
    m.set_cosched_detail(budget_reason=None, job_token_shares={"sst2-lora": 1.0})
    text = m.exposition().decode()
    assert 'zoserve_cosched_job_token_share_ratio{adapter="sst2-lora"} 1.0' in text
    assert 'adapter="other"' not in text.split("zoserve_cosched_job_token_share_ratio")[-1]



def test_ttft_stages_are_observed_clamped_at_zero() -> None:
    m = ZoMetrics(CollectorRegistry())
    m.observe_ttft_stages({"engine_wait": 0.004, "first_forward": -0.001})  # clock jitter: counted as 0
    registry = m.registry
    assert registry.get_sample_value("zoserve_request_ttft_stage_seconds_count", {"stage": "engine_wait"}) == 1
    assert registry.get_sample_value("zoserve_request_ttft_stage_seconds_sum", {"stage": "engine_wait"}) == pytest.approx(0.004)
    assert registry.get_sample_value("zoserve_request_ttft_stage_seconds_sum", {"stage": "first_forward"}) == 0.0
