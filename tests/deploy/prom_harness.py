"""A throwaway Prometheus for tests: scrape given targets, evaluate dashboard queries through the HTTP API.

Used by the harness self-test (a stand-in exporter fed with synthetic values) and, once the service runs,
by the end-to-end test (a live zoserve training a job). Needs the `prometheus` binary (Debian package
`prometheus`); never talks to a Prometheus already running on the machine.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class PromHarnessError(RuntimeError):
    pass


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str


@dataclass(frozen=True)
class QueryResult:
    expr: str
    result_type: str
    series: tuple[Mapping[str, Any], ...]

    @property
    def values(self) -> list[float]:
        """Sample values of an instant vector or scalar (NaN kept as float('nan'))."""
        if self.result_type == "scalar":
            return [float(self.series[0]["value"][1])] if self.series else []
        return [float(s["value"][1]) for s in self.series]


def dashboard_queries(paths: Iterable[Path]) -> list[PanelQuery]:
    """Every panel target expression of the given Grafana dashboard JSON files (rows' nested panels too)."""
    queries: list[PanelQuery] = []
    for path in paths:
        board = json.loads(Path(path).read_text())
        stack = list(board.get("panels", []))
        while stack:
            panel = stack.pop(0)
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append(PanelQuery(board["uid"], panel.get("title", ""), target["refId"], target["expr"]))
    return queries


def dashboard_variables(path: Path) -> dict[str, str]:
    """Template variable -> the value a harness substitutes: the variable's allValue (e.g. `.*`)."""
    board = json.loads(Path(path).read_text())
    return {
        var["name"]: var.get("allValue") or ".*"
        for var in board.get("templating", {}).get("list", [])
        if var.get("type") == "query"
    }


def substitute(expr: str, variables: Mapping[str, str], *, rate_interval: str) -> str:
    """Grafana's template substitution for a Prometheus query: $__rate_interval, $var, ${var}, [[var]]."""
    values = {"__rate_interval": rate_interval, **variables}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise PromHarnessError(f"query uses ${name}, which has no value: {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", replace, expr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PromHarness:
    """`with PromHarness(["127.0.0.1:8000"], workdir=tmp_path) as prom: prom.query("up")`."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        workdir: Path,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        metrics_path: str = "/metrics",
        binary: str | None = None,
    ) -> None:
        self.binary = binary or shutil.which("prometheus")
        if self.binary is None:
            raise PromHarnessError("prometheus binary not found: apt-get install -y prometheus (Debian package)")
        self.workdir = Path(workdir)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(Path(p).resolve()) for p in rule_files],
            "scrape_configs": [
                {"job_name": "zoserve", "metrics_path": metrics_path, "static_configs": [{"targets": list(targets)}]}
            ],
        }
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PromHarness:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config))
        self._log = (self.workdir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_for(lambda: self._get_ok("/-/ready"), timeout_s, "prometheus ready")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def log_tail(self, num_chars: int = 2000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-num_chars:] if path.exists() else ""

    # ---- HTTP API

    def _get_ok(self, path: str) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise PromHarnessError(f"prometheus exited with {self._process.returncode}: {self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:  # 400/422 carry the PromQL error in the body
            body = json.load(err)
        if body.get("status") != "success":
            raise PromHarnessError(f"{path} {dict(params or {})}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> QueryResult:
        data = self._api("query", {"query": expr})
        result = data["result"]
        if data["resultType"] == "scalar":
            result = [{"value": result}]
        return QueryResult(expr, data["resultType"], tuple(result))

    def targets_up(self) -> bool:
        active = self._api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def rule_health(self) -> list[tuple[str, str, str]]:
        """(rule name, health, last error) for every loaded rule."""
        out = []
        for group in self._api("rules")["groups"]:
            for rule in group["rules"]:
                out.append((rule["name"], rule.get("health", ""), rule.get("lastError", "")))
        return out

    # ---- waiting on conditions

    @staticmethod
    def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise PromHarnessError(f"timed out after {timeout_s}s waiting for {what}")
            time.sleep(poll_s)

    def wait_for_data(self, expr: str, timeout_s: float = 30.0) -> QueryResult:
        """Poll an instant query until it returns at least one sample."""
        last: list[QueryResult] = []

        def has_data() -> bool:
            last[:] = [self.query(expr)]
            return bool(last[0].series)

        self.wait_for(has_data, timeout_s, f"data for {expr}")
        return last[0]

    def evaluate_dashboards(
        self, paths: Iterable[Path], *, rate_interval: str, timeout_s: float = 30.0
    ) -> dict[PanelQuery, QueryResult]:
        """Evaluate every panel query (variables at their all-value), waiting until each returns data."""
        results: dict[PanelQuery, QueryResult] = {}
        for path in paths:
            variables = dashboard_variables(Path(path))
            for panel_query in dashboard_queries([Path(path)]):
                expr = substitute(panel_query.expr, variables, rate_interval=rate_interval)
                results[panel_query] = self.wait_for_data(expr, timeout_s)
        return results
