"""helm/zoserve: lint and render with several values sets (Helm's Go SDK through helm-python-sdk; no helm
binary, no cluster, no network) and assert on the manifests.

The chart declares bitnami/redis as an optional dependency. Its archive needs the network
(`helm dependency build`), so the chart is rendered as checked in (dependency absent; the SDK's render, like
`helm template` of a packaged chart, renders whatever charts/ holds) and, for `redis.enabled`, from a temp
copy with a minimal stand-in subchart under charts/redis that renders bitnami's Service and Secret names.
That tests zoserve's wiring to those names, not bitnami's chart.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from deploy_paths import CHART_DIR, DASHBOARD_PATHS, REDIS_STUB_DIR

RELEASE = "demo"
FULLNAME = "demo-zoserve"


class Rendered:
    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = manifests.pop("zoserve/templates/NOTES.txt", "")
        self.docs: list[dict[str, Any]] = [
            doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc
        ]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str = FULLNAME) -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {[d['metadata']['name'] for d in self.all(kind)]}"
        return found[0]

    @property
    def container(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]["spec"]["containers"][0]

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.container["env"]}


def render(values: dict[str, Any] | None = None, chart_dir: Path = CHART_DIR) -> Rendered:
    with helm.Chart.load(chart_dir) as chart:
        return Rendered(chart.render(values or {}, name=RELEASE, namespace="ml", is_install=True))


def secret_ref(env: dict[str, Any]) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def secret_data(r: Rendered, name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in r.one("Secret", name)["data"].items()}


@pytest.fixture()
def chart_with_redis_stub(tmp_path: Path) -> Path:
    chart = tmp_path / "zoserve"
    shutil.copytree(CHART_DIR, chart)
    shutil.copytree(REDIS_STUB_DIR, chart / "charts" / "redis")
    return chart


# ---------------------------------------------------------------------------------------------- lint


def test_lint_clean_except_the_unfetched_dependency() -> None:
    report = helm.lint(CHART_DIR, kube_version="v1.30.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert [m["error"] for m in problems] == ["chart directory is missing these dependencies: redis"]
    assert helm.dependency_list(CHART_DIR) == [
        {"name": "redis", "version": "20.x.x", "repository": "oci://registry-1.docker.io/bitnamicharts",
         "status": "missing"}
    ]


def test_lint_with_dependency_present_has_no_warnings(chart_with_redis_stub: Path) -> None:
    for values in ({}, {"redis": {"enabled": True}}):
        report = helm.lint(chart_with_redis_stub, values, strict=True, kube_version="v1.30.0")
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == []
    # A subchart directory (not a .tgz) reports "unpacked"; `helm dependency build` would write a .tgz.
    assert helm.dependency_list(chart_with_redis_stub)[0]["status"] == "unpacked"


@pytest.mark.parametrize(
    "values",
    [{}, {"device": "cpu"}, {"serviceMonitor": {"enabled": True}}, {"apiKeys": {"admin": ["a"]}},
     {"externalRedis": {"url": "redis://r:6379/0"}, "replicaCount": 2, "persistence": {"accessMode": "ReadWriteMany"}}],
)
def test_defaults_pass_schema(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(chart.merge_values(values))


# -------------------------------------------------------------------------------------------- defaults


def test_defaults_render_gpu_deployment_with_probes_and_storage() -> None:
    r = render()
    kinds = sorted(d["kind"] for d in r.docs)
    assert kinds == ["ConfigMap"] * 3 + ["Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"]
    c = r.container
    assert c["image"] == "ghcr.io/zoserve/zoserve:0.1.0"
    assert c["args"] == ["serve"]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["limits"]["memory"] == "16Gi"
    env = r.env
    assert env["ZOSERVE_HOST"]["value"] == "0.0.0.0" and env["ZOSERVE_PORT"]["value"] == "8000"
    assert env["ZOSERVE_DATA_DIR"]["value"] == "/var/lib/zoserve"
    assert "ZOSERVE_REDIS_URL" not in env and "ZOSERVE_ADMIN_API_KEYS" not in env
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == FULLNAME
    assert {"name": "data", "mountPath": "/var/lib/zoserve"} in c["volumeMounts"]
    pvc = r.one("PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert r.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    service = r.one("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == r.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert "WARNING: no API keys" in r.notes


def test_dashboards_become_labelled_configmaps_identical_to_the_files() -> None:
    r = render()
    maps = {d["metadata"]["name"]: d for d in r.all("ConfigMap")}
    assert len(maps) == len(DASHBOARD_PATHS) == 3
    for path in DASHBOARD_PATHS:
        cm = maps[f"{FULLNAME}-dashboard-{path.stem.removeprefix('zoserve-')}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "zoserve"
        assert cm["data"] == {path.name: path.read_text()}
        json.loads(cm["data"][path.name])
    assert render({"dashboards": {"enabled": False}}).all("ConfigMap") == []


def test_service_monitor_optional() -> None:
    assert render().all("ServiceMonitor") == []
    r = render({"serviceMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "kps"}}})
    sm = r.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    assert sm["spec"]["selector"]["matchLabels"] == r.one("Service")["spec"]["selector"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


# ---------------------------------------------------------------------------------------- GPU and CPU


def test_gpu_count_node_selector_tolerations() -> None:
    r = render({
        "gpu": {"count": 2, "resourceName": "nvidia.com/gpu"},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {"limits": {"memory": "64Gi"}},
    })
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert r.container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "2"}
    assert r.container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_cpu_mode_has_no_gpu_and_sets_kv_cache() -> None:
    r = render({"device": "cpu", "config": {"kv_cache_gib": 4}})
    resources = r.container["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {}) and "nvidia.com/gpu" not in resources.get("requests", {})
    assert r.env["ZOSERVE_KV_CACHE_GIB"]["value"] == "4"
    assert r.container["image"].endswith(":0.1.0-cpu")
    assert "nodeSelector" not in r.one("Deployment")["spec"]["template"]["spec"]


def test_config_becomes_zoserve_env_and_reserved_keys_are_refused() -> None:
    r = render({"config": {"model": "opt-125m-shape", "max_loras": 8, "enforce_eager": True}})
    assert r.env["ZOSERVE_MODEL"]["value"] == "opt-125m-shape"
    assert r.env["ZOSERVE_MAX_LORAS"]["value"] == "8"
    assert r.env["ZOSERVE_ENFORCE_EAGER"]["value"] == "true"
    with pytest.raises(helm.HelmError, match="redis_url"):
        render({"config": {"redis_url": "redis://elsewhere"}})


# -------------------------------------------------------------------------------------------- secrets


def test_api_keys_go_through_the_chart_secret() -> None:
    r = render({"apiKeys": {"admin": ["adm-1", "adm-2"], "inference": ["inf-1"]}})
    data = secret_data(r, FULLNAME)
    assert data == {"admin-api-keys": '["adm-1","adm-2"]', "inference-api-keys": '["inf-1"]'}
    assert secret_ref(r.env["ZOSERVE_ADMIN_API_KEYS"]) == (FULLNAME, "admin-api-keys")
    assert secret_ref(r.env["ZOSERVE_INFERENCE_API_KEYS"]) == (FULLNAME, "inference-api-keys")
    assert "value" not in r.env["ZOSERVE_ADMIN_API_KEYS"]
    assert "WARNING" not in r.notes
    # Changing a key rolls the pods.
    other = render({"apiKeys": {"admin": ["adm-3"], "inference": ["inf-1"]}})
    annotation = "checksum/secret"
    assert (r.one("Deployment")["spec"]["template"]["metadata"]["annotations"][annotation]
            != other.one("Deployment")["spec"]["template"]["metadata"]["annotations"][annotation])


def test_secret_and_env_parse_with_the_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract with service/settings.py: what the pod's environment would hold parses as Settings."""
    from service.settings import Settings

    r = render({"apiKeys": {"admin": ["adm,1", 'q"uote'], "inference": ["inf-1"]},
                "externalRedis": {"url": "redis://r:6379/0"}, "config": {"num_slots": 16, "dtype": "bfloat16"}})
    secret = secret_data(r, FULLNAME)
    for name, env in r.env.items():
        if name.startswith("ZOSERVE_"):
            value = env["value"] if "value" in env else secret[secret_ref(env)[1]]
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.admin_api_keys == ["adm,1", 'q"uote'] and settings.inference_api_keys == ["inf-1"]
    assert settings.redis_url == "redis://r:6379/0"
    assert (settings.host, settings.port, str(settings.data_dir)) == ("0.0.0.0", 8000, "/var/lib/zoserve")
    assert settings.num_slots == 16 and settings.dtype == "bfloat16"


def test_existing_secret_for_api_keys() -> None:
    r = render({"apiKeys": {"existingSecret": "zo-keys", "adminKey": "admin", "inferenceKey": "infer"}})
    assert r.all("Secret") == []
    assert secret_ref(r.env["ZOSERVE_ADMIN_API_KEYS"]) == ("zo-keys", "admin")
    assert secret_ref(r.env["ZOSERVE_INFERENCE_API_KEYS"]) == ("zo-keys", "infer")
    with pytest.raises(helm.HelmError, match="not both"):
        render({"apiKeys": {"existingSecret": "zo-keys", "admin": ["a"]}})


# ---------------------------------------------------------------------------------------------- Redis


def test_external_redis_url_is_a_secret() -> None:
    url = "redis://:pw@redis.example:6379/2"
    r = render({"externalRedis": {"url": url}, "replicaCount": 2,
                "persistence": {"accessMode": "ReadWriteMany"}})
    assert secret_data(r, FULLNAME) == {"redis-url": url}
    assert secret_ref(r.env["ZOSERVE_REDIS_URL"]) == (FULLNAME, "redis-url")
    assert r.one("Deployment")["spec"]["replicas"] == 2
    assert "external Redis" in r.notes


def test_external_redis_existing_secret() -> None:
    r = render({"externalRedis": {"existingSecret": "managed-redis", "existingSecretKey": "url"}})
    assert r.all("Secret") == []
    assert secret_ref(r.env["ZOSERVE_REDIS_URL"]) == ("managed-redis", "url")


def test_redis_dependency_wiring(chart_with_redis_stub: Path) -> None:
    off = render({}, chart_with_redis_stub)
    assert [d for d in off.docs if d["metadata"]["name"].startswith("demo-redis")] == []  # condition honoured

    r = render({"redis": {"enabled": True}, "replicaCount": 2, "persistence": {"accessMode": "ReadWriteMany"}},
               chart_with_redis_stub)
    env = r.env
    names = [e["name"] for e in r.container["env"]]
    # The password is defined before the URL, so Kubernetes expands $(REDIS_PASSWORD) inside it.
    assert names.index("REDIS_PASSWORD") < names.index("ZOSERVE_REDIS_URL")
    assert env["ZOSERVE_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@demo-redis-master:6379/0"
    password_secret, password_key = secret_ref(env["REDIS_PASSWORD"])
    # Both names the zoserve templates point at exist in the release the subchart renders.
    r.one("Service", "demo-redis-master")
    assert password_key in r.one("Secret", password_secret)["data"]

    no_auth = render({"redis": {"enabled": True, "auth": {"enabled": False}}}, chart_with_redis_stub)
    assert no_auth.env["ZOSERVE_REDIS_URL"]["value"] == "redis://demo-redis-master:6379/0"
    assert "REDIS_PASSWORD" not in no_auth.env


# ------------------------------------------------------------------------------------ refused configs


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "replicaCount > 1 needs Redis"),
        ({"replicaCount": 2, "externalRedis": {"url": "redis://r:6379"}}, "ReadWriteMany"),
        ({"redis": {"enabled": True}, "externalRedis": {"url": "redis://r:6379"}}, "exclusive"),
        ({"externalRedis": {"url": "redis://r", "existingSecret": "s"}}, "not both"),
        ({"device": "tpu"}, "device"),
        ({"externalRedis": {"url": "http://r:6379"}}, "url"),
        ({"replicas": 2}, "additional properties"),
    ],
)
def test_invalid_values_are_refused_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_persistence_off_uses_empty_dir_and_existing_claim() -> None:
    r = render({"persistence": {"enabled": False}})
    assert r.all("PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert "LOST" in r.notes
    r = render({"persistence": {"existingClaim": "blobs"}})
    assert r.all("PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "blobs"


# ------------------------------------------------------------------------------ ci/*-values.yaml files

CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))


def test_ci_values_files_cover_the_scenarios() -> None:
    assert {p.name for p in CI_VALUES} == {"default-values.yaml", "cpu-values.yaml", "gpu-values.yaml",
                                           "external-redis-values.yaml", "redis-values.yaml"}


@pytest.mark.parametrize("path", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_ci_values_lint_strict_and_render(path: Path, chart_with_redis_stub: Path) -> None:
    values = helm.values_from_yaml(path.read_text()) or {}
    # Lint and render with the dependency present (stand-in), so strict lint has nothing to say.
    report = helm.lint(chart_with_redis_stub, values, strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report
    r = render(values, chart_with_redis_stub)
    c = r.container
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    gpu_limit = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpu_limit == (None if values.get("device") == "cpu" else str(values.get("gpu", {}).get("count", 1)))
    if values.get("replicaCount", 1) > 1 or values.get("redis", {}).get("enabled"):
        assert "ZOSERVE_REDIS_URL" in r.env
    if values.get("serviceMonitor", {}).get("enabled"):
        r.one("ServiceMonitor")
    assert len(r.all("ConfigMap")) == 3
