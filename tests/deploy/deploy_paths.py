"""Paths and small helpers shared by the deploy tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "zoserve"
# Canonical dashboards live in the chart (Helm's .Files cannot reach outside it); deploy/ holds a copy.
DASHBOARDS_DIR = CHART_DIR / "dashboards"
DEPLOY_DASHBOARDS_DIR = REPO / "deploy" / "grafana" / "dashboards"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
REDIS_STUB_DIR = Path(__file__).resolve().parent / "fixtures" / "redis-stub"
DASHBOARD_PATHS = sorted(DASHBOARDS_DIR.glob("*.json"))


def require_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (apt-get install -y prometheus)")
    return path


def run_promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([require_promtool(), *args], input=stdin, capture_output=True, timeout=60)
