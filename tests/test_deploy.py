"""Static checks of the deployment files in ``deploy/`` (no Docker, no cluster: parsing only).

Every YAML file parses; Kubernetes objects are well formed; every refute container runs one of the
service's commands from the one image with resources set; the scheduler is a singleton; Redis keeps
an append-only file; only documented ``REFUTE_*`` variables are used; the image runs as non-root.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_metrics import FAMILIES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.srs.yaml"]
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
K8S_FILES = [p for p in YAML_FILES if p.parent == K8S and p.name != "kustomization.yaml"]

IMAGE = "refute:0.1.0"
INFRA_IMAGES = {"postgres:15", "redis:7"}
#: Monitoring beside the service in compose (Kubernetes brings its own Prometheus).
MONITORING_IMAGES = {"prom/prometheus:v3.5.0", "grafana/grafana:12.1.0"}

SERVE = ("refute", "serve", "--host", "0.0.0.0", "--port", "8000")
SPOTCHECK = ("refute", "worker", "--queues", "spotcheck", "--concurrency", "2")
PROVE = ("refute", "worker", "--queues", "prove", "--concurrency", "1")
SCHEDULER = ("refute", "worker", "--beat", "--queues", "timers", "--concurrency", "1")
MIGRATE = ("refute", "db", "upgrade")
#: Flower, the Celery monitor, from the same image (the Celery app of verifier.worker).
FLOWER = ("celery", "-A", "verifier.worker", "flower", "--address=0.0.0.0", "--port=5555")
COMMANDS = {SERVE, SPOTCHECK, PROVE, SCHEDULER, MIGRATE, FLOWER}

DOCUMENTED_ENV = {
    "REFUTE_DATABASE_URL",
    "REFUTE_REDIS_URL",
    "REFUTE_BLOB_DIR",
    "REFUTE_HOME",
    "REFUTE_SRS_PATH",
    "REFUTE_SPOT_KEY",
    "REFUTE_CHAIN_RPC_URL",
    "REFUTE_LOG_FORMAT",
    "REFUTE_CHAIN_KEY",
}
#: Variables of the official postgres image (only on the postgres container).
POSTGRES_ENV = {"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD", "PGDATA"}
#: Variables of the official Grafana image (only on the grafana container).
GRAFANA_ENV = {"GF_SECURITY_ADMIN_PASSWORD", "GF_USERS_ALLOW_SIGN_UP", "GF_AUTH_ANONYMOUS_ENABLED"}

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def _k8s_docs() -> list[tuple[Path, Doc]]:
    return [(path, doc) for path in K8S_FILES for doc in _load(path)]


def _named(kind: str, name: str) -> Doc:
    found = [d for _, d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(doc: Doc) -> Doc | None:
    template = doc.get("spec", {}).get("template")
    if doc["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
        assert isinstance(template, dict), f"{doc['kind']}/{doc['metadata']['name']}: no template"
        spec = template["spec"]
        assert isinstance(spec, dict)
        return spec
    return None


def _k8s_containers() -> list[tuple[str, Doc, Doc]]:
    """(workload name, pod spec, container) for every container and init container."""
    out: list[tuple[str, Doc, Doc]] = []
    for _, doc in _k8s_docs():
        spec = _pod_spec(doc)
        if spec is None:
            continue
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            out.append((doc["metadata"]["name"], spec, container))
    return out


def _volume_names(workload: str) -> set[str]:
    """Volumes a workload's containers can mount: the pod's and a StatefulSet's claim templates."""
    (doc,) = [d for _, d in _k8s_docs()
              if _pod_spec(d) is not None and d["metadata"]["name"] == workload]
    spec = _pod_spec(doc)
    assert spec is not None
    templates = doc["spec"].get("volumeClaimTemplates", [])
    return {v["name"] for v in spec.get("volumes", [])} | {t["metadata"]["name"] for t in templates}


def _compose() -> Doc:
    return _load(DEPLOY / "compose.yaml")[0]


def _compose_services() -> dict[str, Doc]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _argv(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    assert isinstance(value, list), f"command must be a list or a string, not {value!r}"
    return tuple(str(v) for v in value)


def _resolved_k8s_argv(container: Doc) -> tuple[str, ...]:
    """The argv a refute container runs: its command, or the image's entrypoint and its args."""
    command = _argv(container.get("command", ["refute"]))
    return command + _argv(container.get("args", []))


def _memory_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T|m|g|b)?", str(value))
    assert match, f"bad memory quantity {value!r}"
    factor = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
              "G": 10**9, "T": 10**12, "m": 2**20, "g": 2**30, "b": 1, None: 1}
    return int(match.group(1)) * factor[match.group(2)]


def _k8s_env_names(container: Doc) -> set[str]:
    """Variable names a container gets: ``env`` plus every key of its ``envFrom`` sources."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = _named("ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            secret = _named("Secret", source["secretRef"]["name"])
            data = secret.get("stringData", secret.get("data"))
        assert isinstance(data, dict)
        names |= set(data)
    return names


# --------------------------------------------------------------------------------- YAML & k8s


def test_deploy_files_exist() -> None:
    for name in ["Dockerfile", "compose.yaml", "compose.srs.yaml", ".env.example", "README.md",
                 "k8s/kustomization.yaml", "k8s/secret.example.yaml"]:
        assert (DEPLOY / name).is_file(), name
    assert len(K8S_FILES) >= 10


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    _load(path)


def test_k8s_documents_are_well_formed() -> None:
    for path, doc in _k8s_docs():
        where = f"{path.name}: {doc.get('kind')}"
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
        assert isinstance(doc.get("kind"), str) and doc["kind"], where
        assert isinstance(doc.get("metadata", {}).get("name"), str), where
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "refute", where


def test_kustomization_lists_every_manifest_but_the_secrets() -> None:
    kustomization = _load(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    expected = {p.name for p in K8S_FILES} - {"secret.example.yaml"}
    assert listed == expected
    assert [i["name"] for i in kustomization["images"]] == [IMAGE.split(":", maxsplit=1)[0]]


def test_k8s_images_and_commands() -> None:
    used: set[tuple[str, ...]] = set()
    for workload, _, container in _k8s_containers():
        image = container["image"]
        assert image == IMAGE or image in INFRA_IMAGES, f"{workload}: image {image}"
        if image == IMAGE:
            argv = _resolved_k8s_argv(container)
            assert argv in COMMANDS, f"{workload}/{container['name']}: {argv}"
            used.add(argv)
    assert used == COMMANDS


@pytest.mark.parametrize(("kind", "name", "argv"), [
    ("Deployment", "refute-api", SERVE),
    ("Deployment", "refute-worker-spotcheck", SPOTCHECK),
    ("Deployment", "refute-worker-prove", PROVE),
    ("Deployment", "refute-scheduler", SCHEDULER),
    ("Job", "refute-migrate", MIGRATE),
    ("Deployment", "refute-flower", FLOWER),
])
def test_each_workload_runs_its_command(kind: str, name: str, argv: tuple[str, ...]) -> None:
    spec = _pod_spec(_named(kind, name))
    assert spec is not None
    assert [_resolved_k8s_argv(c) for c in spec["containers"]] == [argv]
    for init in spec.get("initContainers", []):
        assert _resolved_k8s_argv(init) == MIGRATE


def test_scheduler_is_a_singleton() -> None:
    scheduler = _named("Deployment", "refute-scheduler")
    assert scheduler["spec"]["replicas"] == 1
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"
    for _, doc in _k8s_docs():
        if doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] != "refute-scheduler"
    compose_scheduler = _compose_services()["scheduler"]
    assert compose_scheduler.get("deploy", {}).get("replicas", 1) == 1
    assert "container_name" not in compose_scheduler


def test_replicas_and_autoscaling() -> None:
    assert _named("Deployment", "refute-api")["spec"]["replicas"] == 3
    assert _named("Deployment", "refute-worker-prove")["spec"]["replicas"] == 1
    hpa = _named("HorizontalPodAutoscaler", "refute-worker-spotcheck")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "refute-worker-spotcheck"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA owns the replica count.
    assert "replicas" not in _named("Deployment", "refute-worker-spotcheck")["spec"]


def test_every_k8s_container_has_resources() -> None:
    for workload, _, container in _k8s_containers():
        resources = container.get("resources", {})
        where = f"{workload}/{container['name']}"
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
        assert "memory" in resources.get("limits", {}), where
        assert (_memory_bytes(resources["requests"]["memory"])
                <= _memory_bytes(resources["limits"]["memory"])), where


@pytest.mark.parametrize(("name", "request_", "limit"), [
    ("refute-worker-prove", "4Gi", "16Gi"),
    ("refute-worker-spotcheck", "512Mi", "2Gi"),
])
def test_worker_memory(name: str, request_: str, limit: str) -> None:
    spec = _pod_spec(_named("Deployment", name))
    assert spec is not None
    (container,) = spec["containers"]
    assert container["resources"]["requests"]["memory"] == request_
    assert container["resources"]["limits"]["memory"] == limit


def test_api_probes_and_service() -> None:
    spec = _pod_spec(_named("Deployment", "refute-api"))
    assert spec is not None
    (api,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": 8000}
    assert api["readinessProbe"]["httpGet"]["path"] == "/v1/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/v1/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["port"] in {"http", 8000}
    service = _named("Service", "refute-api")
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["ports"][0]["targetPort"] in {"http", 8000}


def test_pods_run_as_non_root() -> None:
    for _, doc in _k8s_docs():
        spec = _pod_spec(doc)
        if spec is None:
            continue
        where = doc["metadata"]["name"]
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, where
        assert context.get("runAsUser", 0) != 0, where
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False


def test_k8s_volumes() -> None:
    claims = {d["metadata"]["name"]: d for _, d in _k8s_docs()
              if d["kind"] == "PersistentVolumeClaim"}
    assert claims["refute-blobs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "refute-home" in claims
    config = _named("ConfigMap", "refute-config")["data"]
    for workload, spec, container in _k8s_containers():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, workload
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for mount in mounts.values():
            assert mount["name"] in _volume_names(workload), f"{workload}: {mount['name']}"
        # Migrations and Flower touch no blob, circuit or SRS.
        if container["image"] == IMAGE and _resolved_k8s_argv(container) not in {MIGRATE,
                                                                                  FLOWER}:
            for key in ("REFUTE_BLOB_DIR", "REFUTE_HOME"):
                assert config[key] in mounts, f"{workload}: {key} not on a volume"
            srs_dir = str(Path(config["REFUTE_SRS_PATH"]).parent)
            assert mounts[srs_dir].get("readOnly") is True, workload


def test_redis_is_persistent_in_k8s() -> None:
    redis = _named("StatefulSet", "redis")
    spec = _pod_spec(redis)
    assert spec is not None
    (container,) = spec["containers"]
    argv = " ".join([*container.get("command", []), *container.get("args", [])])
    assert "--appendonly yes" in argv
    assert "--appendfsync everysec" in argv
    assert "--maxmemory-policy noeviction" in argv
    claim_names = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {"data": "/data"}
    assert "data" in claim_names


def test_k8s_env_is_documented() -> None:
    for workload, _, container in _k8s_containers():
        names = _k8s_env_names(container)
        allowed = POSTGRES_ENV if container["image"] == "postgres:15" else DOCUMENTED_ENV
        assert names <= allowed, f"{workload}/{container['name']}: {sorted(names - allowed)}"
    config = _named("ConfigMap", "refute-config")["data"]
    assert "REFUTE_SRS_PATH" in config  # production proves with the ceremony SRS


def test_secret_example_holds_placeholders_only() -> None:
    for doc in _load(K8S / "secret.example.yaml"):
        assert doc["kind"] == "Secret"
        for key, value in doc["stringData"].items():
            optional = key in {"REFUTE_CHAIN_RPC_URL", "REFUTE_CHAIN_KEY"}  # empty: no chain
            assert "REPLACE_ME" in value or value.endswith(".invalid") or (
                optional and value == ""), key
    spot_key = _named("Secret", "refute-secrets")["stringData"]["REFUTE_SPOT_KEY"]
    with pytest.raises(ValueError):
        bytes.fromhex(spot_key)  # a placeholder the service refuses


# ------------------------------------------------------------------------------------ compose


def test_compose_images_and_commands() -> None:
    used: set[tuple[str, ...]] = set()
    for name, service in _compose_services().items():
        image = service["image"]
        assert image == IMAGE or image in INFRA_IMAGES | MONITORING_IMAGES, f"{name}: {image}"
        if image == IMAGE:
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"
            argv = (*_argv(service.get("entrypoint", ["refute"])), *_argv(service["command"]))
            assert argv in COMMANDS, f"{name}: {argv}"
            used.add(argv)
    assert used == COMMANDS


def test_compose_depends_on() -> None:
    services = _compose_services()
    for name, service in services.items():
        depends = service.get("depends_on", {})
        targets = depends if isinstance(depends, list) else list(depends)
        for target in targets:
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    for name, service in services.items():
        if service["image"] == IMAGE and name != "migrate":
            conditions = {k: v["condition"] for k, v in service["depends_on"].items()}
            assert conditions["migrate"] == "service_completed_successfully", name
            assert conditions["redis"] == "service_healthy", name


def test_compose_healthchecks_resources_volumes() -> None:
    compose = _compose()
    services = _compose_services()
    for name in ("postgres", "redis", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert "/v1/ready" in " ".join(services["api"]["healthcheck"]["test"])
    assert any(str(p).endswith(":8000") for p in services["api"]["ports"])
    for name, service in services.items():
        assert "memory" in service["deploy"]["resources"]["limits"], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert source in compose["volumes"], f"{name}: volume {source}"
    prove = services["worker-prove"]["deploy"]["resources"]
    assert (prove["reservations"]["memory"], prove["limits"]["memory"]) == ("4g", "16g")
    spot = services["worker-spotcheck"]["deploy"]["resources"]
    assert (spot["reservations"]["memory"], spot["limits"]["memory"]) == ("512m", "2g")
    for name in ("api", "worker-spotcheck", "worker-prove", "scheduler"):
        mounts = {v.split(":")[1] for v in services[name]["volumes"]}
        env = services[name]["environment"]
        assert {env["REFUTE_BLOB_DIR"], env["REFUTE_HOME"]} <= mounts, name


def test_compose_redis_appendonly() -> None:
    redis = _compose_services()["redis"]
    argv = " ".join(_argv(redis["command"]))
    assert "--appendonly yes" in argv
    assert "--appendfsync everysec" in argv
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_compose_env_is_documented() -> None:
    for path in COMPOSE_FILES:
        for name, service in _load(path)[0]["services"].items():
            env = service.get("environment", {})
            names = set(env) if isinstance(env, dict) else {e.split("=")[0] for e in env}
            allowed = {"postgres:15": POSTGRES_ENV, "grafana/grafana:12.1.0": GRAFANA_ENV}.get(
                service.get("image", ""), DOCUMENTED_ENV)
            assert names <= allowed, f"{path.name} {name}: {sorted(names - allowed)}"


def test_compose_srs_overlay() -> None:
    services = _compose_services()
    overlay = _load(DEPLOY / "compose.srs.yaml")[0]["services"]
    refute_services = {n for n, s in services.items() if s["image"] == IMAGE} - {"migrate",
                                                                                  "flower"}
    assert set(overlay) == refute_services
    for service in overlay.values():
        srs = service["environment"]["REFUTE_SRS_PATH"]
        (mount,) = service["volumes"]
        assert mount["target"] == srs and mount["read_only"] is True


def test_env_example_declares_every_substitution() -> None:
    declared = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (DEPLOY / ".env.example").read_text(),
                              flags=re.MULTILINE))
    used: set[str] = set()
    for path in COMPOSE_FILES:
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", path.read_text()))
    assert used <= declared, sorted(used - declared)
    assert {d for d in declared if d.startswith("REFUTE_")} <= DOCUMENTED_ENV


# ----------------------------------------------------------------------------- all files, image


def test_only_documented_refute_variables_anywhere() -> None:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            names = set(re.findall(r"\bREFUTE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
            assert names <= DOCUMENTED_ENV, f"{path.name}: {sorted(names - DOCUMENTED_ENV)}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for k, rest in instructions
            if k == "ARG" and "=" in rest}
    bases = [rest.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
             for k, rest in instructions if k == "FROM"]
    assert bases and set(bases) == {"python:3.11-slim"}
    users = [rest for k, rest in instructions if k == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    entrypoints = [rest for k, rest in instructions if k == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].replace(" ", "") == '["refute"]'
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    for package in ("build-essential", "nodejs", "npm"):
        assert package in runs
    assert "npm ci" in runs
    assert "torch" not in runs and "models" not in runs
    assert re.search(r"pip install [^&]*-e \.", runs)
    assert any(k == "EXPOSE" and rest == "8000" for k, rest in instructions)


# --------------------------------------------------------------------------------- monitoring

GRAFANA = DEPLOY / "grafana"


def _dashboard() -> Doc:
    dashboard = json.loads((GRAFANA / "refute-dashboard.json").read_text())
    assert isinstance(dashboard, dict)
    return dashboard


#: Histogram families: PromQL reads them through ``_bucket``, ``_count`` and ``_sum``.
_HISTOGRAMS = {"refute_proof_seconds", "refute_proof_peak_bytes", "refute_http_request_seconds"}


def _metric_names(expr: str) -> set[str]:
    """The refute metrics a PromQL expression reads (a histogram by its family's name)."""
    names = set()
    for name in re.findall(r"\brefute_[a-z0-9_]+", expr):
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        names.add(family if family in _HISTOGRAMS else name)
    return names


def test_grafana_dashboard_reads_every_family_and_nothing_else() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exported = {f"{name}_total" if f"{name}_total" in _COUNTERS else name for name in FAMILIES}
    exported |= {"refute_http_requests_total", "refute_http_request_seconds"}
    read: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names, target["expr"]
            assert names <= exported, (panel["title"], sorted(names - exported))
            read |= names
    # Every family has a panel (the HTTP ones and the collector's own timing included).
    assert read == exported


#: The families exported as counters (their samples end in ``_total``).
_COUNTERS = {"refute_results_accepted_total", "refute_spotchecks_sampled_total",
             "refute_spotchecks_total", "refute_disputes_opened_total",
             "refute_disputes_resolved_total", "refute_proofs_total",
             "refute_webhook_attempts_total", "refute_dead_letters_total"}


def test_grafana_and_prometheus_provisioning() -> None:
    (source,) = _load(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")[0][
        "datasources"]
    assert (source["type"], source["uid"]) == ("prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090"
    (provider,) = _load(GRAFANA / "provisioning" / "dashboards" / "refute.yaml")[0]["providers"]
    scrape = _load(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"]
    targets = {t for job in scrape for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"api:8000", "flower:5555"}
    compose = _compose()
    services = compose["services"]
    assert {"flower", "prometheus", "grafana"} <= set(services)
    for name, config in compose["configs"].items():
        assert (DEPLOY / config["file"]).is_file(), name
    mounted = {c["target"]: compose["configs"][c["source"]]["file"]
               for c in services["grafana"]["configs"]}
    dashboards_dir = provider["options"]["path"]
    assert mounted[f"{dashboards_dir}/refute-dashboard.json"] == "./grafana/refute-dashboard.json"
    assert "/etc/grafana/provisioning/datasources/prometheus.yaml" in mounted
    (prometheus_config,) = services["prometheus"]["configs"]
    assert compose["configs"][prometheus_config["source"]]["file"] == (
        "./prometheus/prometheus.yml")
    # Monitoring listens on loopback only; Flower has no Secret and no volume.
    for name in ("flower", "prometheus", "grafana"):
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name
    assert services["flower"]["volumes"] == []
    assert set(services["flower"]["environment"]) == {"REFUTE_REDIS_URL"}
    flower = _pod_spec(_named("Deployment", "refute-flower"))
    assert flower is not None
    (container,) = flower["containers"]
    assert [s for s in container["envFrom"] if "secretRef" in s] == []
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"
    assert _named("Service", "refute-flower")["spec"]["ports"][0]["port"] == 5555
