"""deploy/prometheus and docker-compose: promtool-valid config and rules over catalogue metrics."""

from __future__ import annotations

from pathlib import Path

import yaml

from deploy_paths import PROMETHEUS_DIR, REPO, run_promtool
from promql_refs import TARGET_LABELS, family_of, label_refs, metric_refs
from service.metrics import METRIC_NAMES


def _ok(result) -> str:
    return (result.stdout + result.stderr).decode()


def test_rules_pass_promtool() -> None:
    result = run_promtool("check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert result.returncode == 0, _ok(result)


def test_config_passes_promtool() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, _ok(result)


def test_rules_reference_only_catalogue_metrics_and_labels() -> None:
    groups = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert any("alert" in r for r in rules) and any("record" in r for r in rules)
    for rule in rules:
        refs = metric_refs(rule["expr"])
        known = set(TARGET_LABELS)
        for ref in refs:
            assert family_of(ref) is not None, f"{ref} in {rule.get('record') or rule.get('alert')}"
            known.update(METRIC_NAMES[family_of(ref)][1])
        assert label_refs(rule["expr"]) <= known, rule["expr"]


def test_compose_wires_the_stack_from_deploy_files() -> None:
    compose_path = REPO / "deploy" / "docker-compose.yaml"
    compose = yaml.safe_load(compose_path.read_text())
    services = compose["services"]
    assert set(services) == {"zoserve", "redis", "prometheus", "grafana"}
    assert services["zoserve"]["environment"]["ZOSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert services["zoserve"]["build"]["dockerfile"] == "Dockerfile"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (compose_path.parent / source).exists(), volume
    # Every image is pinned by tag.
    for name in ("redis", "prometheus", "grafana"):
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["zoserve:8000"]


def test_dockerfile_targets_user_healthcheck_entrypoint() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "AS cpu" in text and "AS gpu" in text
    assert "ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0" in text  # matches pyproject's vllm==0.32.0
    assert 'vllm==0.32.0' in (REPO / "pyproject.toml").read_text()
    assert text.count("USER 10001:10001") == 2
    assert text.count("/healthz") == 2
    assert text.count('ENTRYPOINT ["zoserve"]') == 2 and text.count('CMD ["serve"]') == 2
    assert '--excludes uv-excludes.txt -e ".[cpu]"' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    for copied in ("service", "scheduler", "adapters_store", "pyproject.toml", "uv-excludes.txt"):
        assert copied not in ignored and (REPO / copied).exists()
    assert Path(REPO / "README.md").exists()
