"""Static checks of the Helm chart in chart/.

The chart must lint, render with nothing downloaded, produce objects that a
Kubernetes API server of the target version would accept, and keep the
operational promises the gateway relies on: probes on the right endpoints, a
grace period long enough to drain, selectors that match, secrets that stay
out of the chart when an existing Secret is named, and a values schema that
refuses bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart"
PRODUCTION_VALUES = Path(__file__).with_name("values-production.yaml")
KIND_VALUES = REPO / "k8s" / "values-kind.yaml"
KUBE_VERSION = "1.33.0"
RELEASE = "gw"
NAMESPACE = "realtime"
FULLNAME = f"{RELEASE}-redis-ws-gateway"

# Custom resources: kubernetes_validate ships only the built-in API. Any other
# kind without a schema is a typo in apiVersion/kind and must fail.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}

SCHEMA_ERROR = "values don't meet the specifications of the schema"

Manifest = dict[str, Any]

# Options that are off by default, switched on together so their rendering is
# validated too.
DEV_EXTRAS = [
    "--set",
    "redis.auth.enabled=true",
    "--set",
    "redis.persistence.enabled=true",
    "--set",
    "httpRoute.enabled=true",
    "--set",
    "httpRoute.parentRefs[0].name=public",
    "--set",
    "httpRoute.hostnames[0]=gateway.example.com",
    # A dev route with anonymous full access, on purpose.
    "--set",
    "gateway.acknowledgeAnonymousFullAccess=true",
]


def _find_helm() -> str | None:
    from_env = os.environ.get("HELM")
    if from_env:
        # Named explicitly: a wrong path is an error, not a reason to skip.
        return from_env
    local = REPO / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@dataclass(frozen=True)
class Helm:
    path: str
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.path, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO,
            env=self.env,
        )


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    path = _find_helm()
    if path is None:
        pytest.skip(
            "helm not found: set HELM, or build it into .tools/bin/helm (the project's "
            "setup script does), or put it on PATH"
        )
    # Keep helm away from the developer's own repositories and caches.
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for key in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[key] = str(home / key.lower())
    return Helm(path, env)


def template(helm: Helm, *args: str) -> subprocess.CompletedProcess[str]:
    return helm.run(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *args,
    )


def render(helm: Helm, *args: str) -> list[Manifest]:
    proc = template(helm, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def all_of(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in all_of(manifests, kind) if name is None or m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_deployment(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment", FULLNAME)


def gateway_container(manifests: list[Manifest]) -> Manifest:
    containers = gateway_deployment(manifests)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gateway")


def settings(manifests: list[Manifest]) -> dict[str, str]:
    data: dict[str, str] = one(manifests, "ConfigMap", FULLNAME)["data"]
    return data


def env_source(container: Manifest, name: str) -> Manifest:
    matches = [e for e in container.get("env", []) if e["name"] == name]
    assert len(matches) == 1, f"{name} defined {len(matches)} times in {container['name']}"
    return matches[0]


def selftest_pod(manifests: list[Manifest]) -> Manifest:
    hooks = [
        m
        for m in all_of(manifests, "Pod")
        if m["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    ]
    assert len(hooks) == 1, f"expected one helm test pod, found {len(hooks)}"
    return hooks[0]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet"):
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]
        elif m["kind"] == "Pod":
            yield f"Pod/{m['metadata']['name']}", m["spec"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def resolve_port(container: Manifest, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert named, f"container has no port named {port!r}"
    return int(named[0])


@pytest.fixture(scope="session")
def default_manifests(helm: Helm) -> list[Manifest]:
    return render(helm)


@pytest.fixture(scope="session")
def production_manifests(helm: Helm) -> list[Manifest]:
    return render(helm, "-f", str(PRODUCTION_VALUES))


@pytest.fixture(scope="session", params=["default", "production", "dev-extras", "kind"])
def rendered(request: pytest.FixtureRequest, helm: Helm) -> list[Manifest]:
    args = {
        "default": [],
        "production": ["-f", str(PRODUCTION_VALUES)],
        "dev-extras": DEV_EXTRAS,
        "kind": ["-f", str(KIND_VALUES)],
    }[request.param]
    return render(helm, *args)


# --------------------------------------------------------------------- lint


@pytest.mark.parametrize(
    "values", [None, PRODUCTION_VALUES, KIND_VALUES], ids=["default", "production", "kind"]
)
def test_chart_lints_strictly(helm: Helm, values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict"]
    if values is not None:
        args += ["-f", str(values)]
    proc = helm.run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_chart_has_no_remote_dependencies() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "redis-ws-gateway"
    for dep in chart.get("dependencies") or []:
        repo = dep.get("repository", "")
        assert not repo or repo.startswith("file://"), f"remote dependency {dep}"
    assert not list(CHART.glob("charts/*.tgz")), "vendored chart archives need a network to refresh"


# ------------------------------------------------------- Kubernetes validity


def test_every_object_is_valid_kubernetes(rendered: list[Manifest]) -> None:
    checked = 0
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}")
        checked += 1
    assert checked >= 6


def test_object_names_are_unique_per_kind(rendered: list[Manifest]) -> None:
    keys = [(m["kind"], m["metadata"]["name"]) for m in rendered]
    assert len(keys) == len(set(keys))


# ----------------------------------------------------------------- probes


def test_probes_use_health_endpoints_on_the_internal_port(rendered: list[Manifest]) -> None:
    """On the internal port, which takes no client sockets: a flood of
    handshakes on the public port, refused at its caps, cannot fail the
    probes and get a pod killed (docs/SECURITY.md)."""
    container = gateway_container(rendered)
    port = int(settings(rendered)["REDIS_WS_GATEWAY_PORT"])
    internal = int(settings(rendered)["REDIS_WS_GATEWAY_INTERNAL_PORT"])
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("http", port),
        ("internal", internal),
    ]
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert resolve_port(container, http_get["port"]) == internal, probe


def test_container_ports_move_probes_and_service_together(helm: Helm) -> None:
    manifests = render(helm, "--set", "containerPort=9100", "--set", "internalPort=9200")
    container = gateway_container(manifests)
    assert settings(manifests)["REDIS_WS_GATEWAY_PORT"] == "9100"
    assert settings(manifests)["REDIS_WS_GATEWAY_INTERNAL_PORT"] == "9200"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert resolve_port(container, container[probe]["httpGet"]["port"]) == 9200
    service_port = one(manifests, "Service", FULLNAME)["spec"]["ports"][0]
    assert resolve_port(container, service_port["targetPort"]) == 9100


# -------------------------------------------------------------- selectors


def test_service_selects_only_gateway_pods(rendered: list[Manifest]) -> None:
    service = one(rendered, "Service", FULLNAME)
    selector = service["spec"]["selector"]
    pod_labels = gateway_deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    assert selects(selector, pod_labels)
    container = gateway_container(rendered)
    for port in service["spec"]["ports"]:
        assert resolve_port(container, port["targetPort"]) == container["ports"][0]["containerPort"]
    for redis in all_of(rendered, "StatefulSet"):
        assert not selects(selector, redis["spec"]["template"]["metadata"]["labels"])
    assert not selects(selector, selftest_pod(rendered)["metadata"]["labels"])


def test_pdb_selects_the_deployment_pods(rendered: list[Manifest]) -> None:
    pdb = one(rendered, "PodDisruptionBudget")
    deployment = gateway_deployment(rendered)
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
    assert not selects(selector, selftest_pod(rendered)["metadata"]["labels"])
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])


def test_topology_spread_counts_the_gateway_pods(rendered: list[Manifest]) -> None:
    spec = gateway_deployment(rendered)["spec"]["template"]
    constraints = spec["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} >= {"kubernetes.io/hostname"}
    for constraint in constraints:
        assert selects(constraint["labelSelector"]["matchLabels"], spec["metadata"]["labels"])


# ------------------------------------------------------------ autoscaling


def test_hpa_scales_the_deployment_on_cpu_and_connections(
    production_manifests: list[Manifest],
) -> None:
    hpa = one(production_manifests, "HorizontalPodAutoscaler")
    deployment = gateway_deployment(production_manifests)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods_metric = metrics["Pods"]["pods"]
    assert pods_metric["metric"]["name"] == "redis_ws_gateway_connections"
    assert pods_metric["target"] == {"type": "AverageValue", "averageValue": "2000"}
    # The HPA owns the replica count; a fixed one would be reset on every upgrade.
    assert "replicas" not in deployment["spec"]


def test_hpa_scales_down_one_pod_at_a_time(production_manifests: list[Manifest]) -> None:
    scale_down = one(production_manifests, "HorizontalPodAutoscaler")["spec"]["behavior"][
        "scaleDown"
    ]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert scale_down["policies"]
    for policy in scale_down["policies"]:
        assert policy == {"type": "Pods", "value": 1, "periodSeconds": policy["periodSeconds"]}
        assert policy["periodSeconds"] >= 120


def test_default_install_has_fixed_replicas_and_no_hpa(default_manifests: list[Manifest]) -> None:
    assert not all_of(default_manifests, "HorizontalPodAutoscaler")
    assert gateway_deployment(default_manifests)["spec"]["replicas"] == 1


def test_cpu_only_hpa_has_no_custom_metric(helm: Helm) -> None:
    hpa = one(render(helm, "--set", "autoscaling.enabled=true"), "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]


# ---------------------------------------------------------------- secrets


def test_existing_auth_secret_is_referenced_and_nothing_inlined(
    production_manifests: list[Manifest],
) -> None:
    assert not all_of(production_manifests, "Secret")
    gateway = gateway_container(production_manifests)
    refs = {
        name: env_source(gateway, name)["valueFrom"]["secretKeyRef"]
        for name in ("JWT_SECRET", "GATEWAY_API_KEY", "REDIS_PASSWORD")
    }
    assert refs["JWT_SECRET"] == {"name": "gateway-credentials", "key": "jwt"}
    assert refs["GATEWAY_API_KEY"] == {"name": "gateway-credentials", "key": "api-key"}
    assert refs["REDIS_PASSWORD"] == {"name": "gateway-redis", "key": "password"}
    selftest = selftest_pod(production_manifests)["spec"]["containers"][0]
    token = env_source(selftest, "GATEWAY_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token == {"name": "gateway-credentials", "key": "api-key"}
    # The test pod needs no signing key and no Redis credential: it publishes
    # through the gateway's /publish with the API key.
    assert {e["name"] for e in selftest["env"]} == {"GATEWAY_TOKEN"}


def test_inline_secret_values_are_dropped_when_existing_secret_is_named(helm: Helm) -> None:
    marker = "do-not-render-this-jwt-secret"
    proc = template(
        helm,
        "--set",
        "auth.existingSecret=mine",
        "--set",
        f"auth.jwtSecret={marker}",
        "--set",
        f"auth.apiKey={marker}-key",
    )
    assert proc.returncode == 0, proc.stderr
    assert marker not in proc.stdout
    for secret in all_of([d for d in yaml.safe_load_all(proc.stdout) if d], "Secret"):
        assert "jwt-secret" not in (secret.get("data") or {})
        assert "jwt-secret" not in (secret.get("stringData") or {})


def test_chart_secret_is_generated_without_existing_secret(
    default_manifests: list[Manifest],
) -> None:
    secret = one(default_manifests, "Secret", FULLNAME)
    assert set(secret["data"]) == {"jwt-secret", "api-key"}
    assert all(len(v) >= 40 for v in secret["data"].values())
    container = gateway_container(default_manifests)
    for name, key in (("JWT_SECRET", "jwt-secret"), ("GATEWAY_API_KEY", "api-key")):
        assert env_source(container, name)["valueFrom"]["secretKeyRef"] == {
            "name": FULLNAME,
            "key": key,
        }
    names = [e["name"] for e in container["env"]]
    assert "REDIS_PASSWORD" not in names


def test_dev_redis_password_comes_from_the_charts_secret(helm: Helm) -> None:
    manifests = render(helm, *DEV_EXTRAS)
    redis_secret = one(manifests, "Secret", f"{FULLNAME}-redis")
    ref = env_source(gateway_container(manifests), "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{FULLNAME}-redis", "key": "redis-password"}
    assert "redis-password" in redis_secret["data"]
    redis = one(manifests, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in redis["args"]


# -------------------------------------------------------------- shutdown


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-f", str(PRODUCTION_VALUES)],
        [
            "--set",
            "shutdown.preStopSleepSeconds=20",
            "--set",
            "shutdown.drainWindowSeconds=60",
            "--set",
            "shutdown.shutdownTimeoutSeconds=61",
            "--set",
            "shutdown.graceMarginSeconds=0",
        ],
        ["--set", "shutdown.shutdownTimeoutSeconds=300"],
    ],
    ids=["default", "production", "long-drain", "long-timeout"],
)
def test_grace_period_covers_prestop_and_drain(helm: Helm, args: list[str]) -> None:
    manifests = render(helm, *args)
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    command = gateway_container(manifests)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop > 0
    drain = float(settings(manifests)["DRAIN_WINDOW_SECONDS"])
    hard_bound = float(settings(manifests)["SHUTDOWN_TIMEOUT_SECONDS"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain
    # The kubelet's SIGKILL must not pre-empt the gateway's own exit bound.
    assert grace >= pre_stop + hard_bound


# ----------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "bad",
    [
        "replicaCount=0",
        "replicaCount=-3",
        "logFormat=xml",
        "logLevel=verbose",
        "notAKnownKey=1",
        "containerPort=0",
        "service.port=70000",
        "gateway.maxChannelsPerClient=0",
        "autoscaling.minReplicas=0",
        "ingress.nginxWebsocket.timeoutSeconds=5",
        "config.channel_policies[0].pattern=market:*,config.channel_policies[0].policy=fast",
        "redis.bogus=true",
    ],
)
def test_schema_rejects_bad_values(helm: Helm, bad: str) -> None:
    proc = template(helm, "--set", bad)
    assert proc.returncode != 0
    assert SCHEMA_ERROR in proc.stderr, proc.stderr


def test_schema_is_draft7_and_accepts_the_shipped_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for path in (CHART / "values.yaml", PRODUCTION_VALUES, KIND_VALUES):
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, f"{path.name}: {errors}"
    # Every top-level key in values.yaml is described (and so not "additional").
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])


INCONSISTENT_VALUES = {
    "no-redis": (["redis.enabled=false"], "externalRedis.url is required"),
    "two-redis": (["externalRedis.url=redis://elsewhere:6379"], "set redis.enabled=false"),
    "unknown-default-role": (
        ["config.roles.admin.allow[0]=*", "gateway.defaultRole=user"],
        "not one of config.roles",
    ),
    "timeout-below-drain": (
        ["shutdown.drainWindowSeconds=30", "shutdown.shutdownTimeoutSeconds=10"],
        "must not be shorter",
    ),
    "route-without-parent": (["httpRoute.enabled=true"], "httpRoute.parentRefs"),
    "sharded-without-cluster": (
        [
            "redis.enabled=false",
            "externalRedis.url=redis://r:6379",
            "externalRedis.shardedChannels={market:*}",
        ],
        "shardedChannels needs externalRedis.clusterNodes",
    ),
    "ingress-anonymous-wildcard": (["ingress.enabled=true"], "anyone could read every channel"),
    "route-anonymous-wildcard": (
        ["httpRoute.enabled=true", "httpRoute.parentRefs[0].name=public"],
        "gateway.acknowledgeAnonymousFullAccess=true",
    ),
    "internal-port-is-public-port": (["internalPort=8889"], "internalPort must differ"),
    "hpa-min-above-max": (
        ["autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"],
        "minReplicas must not exceed",
    ),
}


@pytest.mark.parametrize(
    ("sets", "message"), list(INCONSISTENT_VALUES.values()), ids=list(INCONSISTENT_VALUES)
)
def test_inconsistent_values_fail_with_a_clear_message(
    helm: Helm, sets: list[str], message: str
) -> None:
    proc = template(helm, *(arg for value in sets for arg in ("--set", value)))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# ------------------------------------------------------------- helm test


def test_helm_test_pod_runs_the_selftest_against_the_service(rendered: list[Manifest]) -> None:
    pod = selftest_pod(rendered)
    service = one(rendered, "Service", FULLNAME)
    assert pod["spec"]["restartPolicy"] == "Never"
    container = pod["spec"]["containers"][0]
    assert container["image"] == gateway_container(rendered)["image"]
    args = container["args"]
    assert args[:2] == ["redis-ws-gateway", "selftest"]
    url = args[args.index("--url") + 1]
    assert url == f"ws://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/ws"
    assert "--redis-url" not in args  # publishes through /publish, any Redis topology


# ----------------------------------------------------------------- ingress


def test_ingress_keeps_websockets_open_and_terminates_tls(
    production_manifests: list[Manifest],
) -> None:
    ingress = one(production_manifests, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    rule_hosts = {r["host"] for r in ingress["spec"]["rules"]}
    tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    assert rule_hosts <= tls_hosts
    service = one(production_manifests, "Service", FULLNAME)
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in port_names


def _sse_paths(ingress: Manifest) -> list[Manifest]:
    return [
        path
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
        if path["path"] == "/sse"
    ]


def test_ingress_routes_sse_unbuffered(production_manifests: list[Manifest], helm: Helm) -> None:
    """The Server-Sent Events fallback reaches the gateway on every host,
    with the proxy's response buffering off (ingress-nginx)."""
    ingress = one(production_manifests, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == (
        "off"
    )
    sse = _sse_paths(ingress)
    assert len(sse) == len(ingress["spec"]["rules"])
    service = one(production_manifests, "Service", FULLNAME)
    for path in sse:
        assert path["pathType"] == "Exact"
        assert path["backend"]["service"]["name"] == service["metadata"]["name"]
        assert path["backend"]["service"]["port"]["name"] == "http"
    # Only /ws routed: /sse is added all the same, once.
    only_ws = render(
        helm,
        "-f",
        str(PRODUCTION_VALUES),
        "--set",
        "ingress.hosts[0].host=g.example.com",
        "--set",
        "ingress.hosts[0].paths[0].path=/ws",
        "--set",
        "ingress.hosts[0].paths[0].pathType=Exact",
    )
    paths = [p["path"] for p in one(only_ws, "Ingress")["spec"]["rules"][0]["http"]["paths"]]
    assert sorted(paths) == ["/sse", "/ws"]
    # Traefik (the kind e2e's controller) streams event streams as they are:
    # the route, without nginx annotations.
    kind = one(render(helm, "-f", str(KIND_VALUES)), "Ingress")
    assert len(_sse_paths(kind)) == 2 and "annotations" not in kind["metadata"]
    off = one(
        render(helm, "-f", str(PRODUCTION_VALUES), "--set", "ingress.sse.enabled=false"), "Ingress"
    )
    assert not _sse_paths(off)
    assert "nginx.ingress.kubernetes.io/proxy-buffering" not in off["metadata"]["annotations"]


def test_ingress_is_off_by_default(default_manifests: list[Manifest]) -> None:
    assert not all_of(default_manifests, "Ingress")


def test_kind_values_expose_two_replicas_on_a_local_host(helm: Helm) -> None:
    manifests = render(helm, "-f", str(KIND_VALUES))
    assert gateway_deployment(manifests)["spec"]["replicas"] == 2
    ingress = one(manifests, "Ingress")
    assert [r["host"] for r in ingress["spec"]["rules"]] == ["gateway.localtest.me", "localhost"]
    # k8s/install-ingress.sh installs Traefik, which serves this class.
    assert ingress["spec"]["ingressClassName"] == "traefik"
    assert "annotations" not in ingress["metadata"]
    # The bundled Redis runs the image built locally and loaded into kind.
    redis = one(manifests, "StatefulSet")
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "redis-ws-gateway/redis:bookworm"
    )


def test_http_route_points_at_the_service(helm: Helm) -> None:
    manifests = render(helm, *DEV_EXTRAS)
    route = one(manifests, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"name": "public"}]
    service = one(manifests, "Service", FULLNAME)
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [
        {"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}
    ]


# ------------------------------------------------------------------ config


def test_config_file_is_mounted_where_the_gateway_reads_it(rendered: list[Manifest]) -> None:
    config_path = settings(rendered)["REDIS_WS_GATEWAY_CONFIG"]
    assert config_path == "/etc/redis-ws-gateway/config.yaml"
    pod = gateway_deployment(rendered)["spec"]["template"]["spec"]
    container = gateway_container(rendered)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = []
    for mount in container["volumeMounts"]:
        config_map = volumes[mount["name"]].get("configMap")
        if config_map is None:
            continue
        assert config_map["name"] == FULLNAME
        for item in config_map["items"]:
            mounted.append((f"{mount['mountPath']}/{item['path']}", item["key"]))
    assert (config_path, "config.yaml") in mounted
    parsed = yaml.safe_load(settings(rendered)["config.yaml"])
    assert isinstance(parsed, dict)
    assert set(parsed) <= {"roles", "channel_policies", "durable"}


def test_production_config_carries_roles_and_policies(
    production_manifests: list[Manifest],
) -> None:
    parsed = yaml.safe_load(settings(production_manifests)["config.yaml"])
    assert set(parsed["roles"]) == {"admin", "viewer"}
    assert {"pattern": "market:*", "policy": "conflate"} in parsed["channel_policies"]
    assert settings(production_manifests)["DEFAULT_ROLE"] in parsed["roles"]


def test_every_config_map_reference_exists(rendered: list[Manifest]) -> None:
    data = settings(rendered)
    for env in gateway_container(rendered)["env"]:
        ref = env.get("valueFrom", {}).get("configMapKeyRef")
        if ref is not None:
            assert ref["name"] == FULLNAME
            assert ref["key"] in data, ref["key"]
    env_keys = {k for k in data if k != "config.yaml"}
    referenced = {
        e["name"]
        for e in gateway_container(rendered)["env"]
        if "configMapKeyRef" in e.get("valueFrom", {})
    }
    assert referenced == env_keys


def test_config_change_rolls_the_pods(helm: Helm) -> None:
    def checksum(*args: str) -> str:
        template_meta = gateway_deployment(render(helm, *args))["spec"]["template"]["metadata"]
        value: str = template_meta["annotations"]["checksum/config"]
        return value

    baseline = checksum()
    assert checksum() == baseline
    assert checksum("--set", "logLevel=debug") != baseline
    policy = "config.channel_policies[0].pattern=a:*,config.channel_policies[0].policy=conflate"
    assert checksum("--set", policy) != baseline


# ---------------------------------------------------------------- security


def test_every_pod_runs_restricted(rendered: list[Manifest]) -> None:
    specs = list(pod_specs(rendered))
    assert len(specs) >= 2
    for where, spec in specs:
        assert spec["automountServiceAccountToken"] is False, where
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "resources" in container, where


def test_gateway_runs_as_the_image_user(default_manifests: list[Manifest]) -> None:
    pod_sc = gateway_deployment(default_manifests)["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsUser"] == 10001


def test_dev_redis_uses_the_official_image_and_its_own_service(
    default_manifests: list[Manifest],
) -> None:
    redis = one(default_manifests, "StatefulSet", f"{FULLNAME}-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "redis:7.4-alpine"
    service = one(default_manifests, "Service", f"{FULLNAME}-redis")
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    url = settings(default_manifests)["REDIS_URL"]
    assert url == f"redis://{FULLNAME}-redis:{service['spec']['ports'][0]['port']}"


def test_production_renders_no_dev_redis(production_manifests: list[Manifest]) -> None:
    assert not all_of(production_manifests, "StatefulSet")
    assert settings(production_manifests)["REDIS_URL"].startswith("rediss://")


def test_rendered_config_file_is_accepted_by_the_gateway(helm: Helm, tmp_path: Path) -> None:
    """The chart's config.yaml must parse with the gateway's own loader, so a
    values file the schema accepts never makes the pods exit at start."""
    from redis_ws_gateway.config import load_settings

    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "config": {
                    "roles": {"admin": {"allow": ["*"]}, "user": {"allow": ["market:*"]}},
                    "channel_policies": [{"pattern": "market:*", "policy": "conflate"}],
                    "durable": [{"pattern": "engine:decision:*", "maxlen": 5000}],
                    "streams": [{"channel": "orders:fills", "key": "fills", "field": "data"}],
                    "snapshots": [{"pattern": "market:tick:*", "key": "market:last:{suffix}"}],
                }
            }
        )
    )
    manifests = render(helm, "-f", str(values))
    [configmap] = [m for m in all_of(manifests, "ConfigMap") if "config.yaml" in m["data"]]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(configmap["data"]["config.yaml"])
    s = load_settings({"REDIS_WS_GATEWAY_CONFIG": str(config_file)})
    assert [r.pattern for r in s.durable] == ["engine:decision:*"] and s.durable[0].maxlen == 5000
    assert s.streams[0].key == "fills" and s.snapshots[0].key == "market:last:{suffix}"
    assert s.roles["user"].allow == ("market:*",)


def test_external_redis_cluster_with_sharded_channels_reaches_the_gateway(helm: Helm) -> None:
    manifests = render(
        helm,
        "--set", "redis.enabled=false",
        "--set", "externalRedis.url=redis://ignored:6379",
        "--set", "externalRedis.clusterNodes={c0.redis:6379,c1.redis:6379}",
        "--set", "externalRedis.shardedChannels={market:tick:*,ui:*}",
    )  # fmt: skip
    from redis_ws_gateway.config import load_settings

    env = settings(manifests)
    env.pop("REDIS_WS_GATEWAY_CONFIG", None)  # the mounted file; checked elsewhere
    s = load_settings(env)
    assert s.redis_cluster_nodes == (("c0.redis", 6379), ("c1.redis", 6379))
    assert s.redis_sharded_channels == ("market:tick:*", "ui:*")


def test_external_redis_sentinel_tls_and_acl_user_reach_the_gateway(helm: Helm) -> None:
    manifests = render(
        helm,
        "--set", "redis.enabled=false",
        "--set", "externalRedis.url=rediss://ignored:6379",
        "--set", "externalRedis.existingSecret=redis-creds",
        "--set", "externalRedis.username=gateway",
        "--set", "externalRedis.sentinels={s1.redis:26379,s2.redis:26379}",
        "--set", "externalRedis.sentinelMaster=prod",
        "--set", "externalRedis.sentinelPasswordKey=sentinel-password",
        "--set", "externalRedis.tls.caSecret=redis-ca",
        "--set", "externalRedis.tls.clientCertSecret=redis-client",
    )  # fmt: skip
    env = settings(manifests)
    assert env["REDIS_SENTINELS"] == "s1.redis:26379,s2.redis:26379"
    assert env["REDIS_SENTINEL_MASTER"] == "prod" and env["REDIS_USERNAME"] == "gateway"
    assert env["REDIS_TLS_CA_FILE"] == "/etc/redis-ws-gateway/redis-ca/ca.crt"
    container = gateway_container(manifests)
    assert env_source(container, "REDIS_SENTINEL_PASSWORD")["valueFrom"]["secretKeyRef"] == {
        "name": "redis-creds",
        "key": "sentinel-password",
    }
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"redis-ca": "redis-ca", "redis-client": "redis-client"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["redis-client"] == "/etc/redis-ws-gateway/redis-client"
    for name in ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"):
        assert env[name].startswith(tuple(mounts.values()))


# ------------------------------------------------------- exposed installs


def exposed_values(tmp_path: Path) -> Path:
    """The values block docs/OPERATIONS.md shows for an install reachable from
    the internet, written to a file as a reader would copy it."""
    doc = (REPO / "docs" / "OPERATIONS.md").read_text()
    marker = "<!-- exposed-values: rendered by tests/chart/test_chart.py -->"
    assert marker in doc
    block = doc.split(marker, 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "values-exposed.yaml"
    path.write_text(block)
    return path


def test_the_documented_exposed_install_renders_safely(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, "-f", str(exposed_values(tmp_path)))
    env = settings(manifests)
    assert env["REQUIRE_AUTH"] == "true"
    assert env["ALLOWED_ORIGINS"] == "https://ui.example.com"
    container = gateway_container(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["internal"] == int(env["REDIS_WS_GATEWAY_INTERNAL_PORT"]) != ports["http"]
    public = one(manifests, "Service", FULLNAME)
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    ingress = one(manifests, "Ingress")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    monitor = one(manifests, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["internal"]


def test_the_internal_port_is_never_on_a_public_service(helm: Helm) -> None:
    manifests = render(
        helm,
        "--set", "service.type=LoadBalancer",
        "--set", "ingress.enabled=true",
        "--set", "gateway.requireAuth=true",
    )  # fmt: skip
    internal = one(manifests, "Service", f"{FULLNAME}-internal")
    assert internal["spec"]["type"] == "ClusterIP"
    assert [p["targetPort"] for p in internal["spec"]["ports"]] == ["internal"]
    public = one(manifests, "Service", FULLNAME)
    assert public["spec"]["type"] == "LoadBalancer"
    assert all(p["targetPort"] == "http" for p in public["spec"]["ports"])
    assert selects(
        internal["spec"]["selector"],
        gateway_deployment(manifests)["spec"]["template"]["metadata"]["labels"],
    )


@pytest.mark.parametrize(
    "sets",
    [
        ["ingress.enabled=true", "gateway.acknowledgeAnonymousFullAccess=true"],
        ["ingress.enabled=true", "gateway.requireAuth=true"],
        ["ingress.enabled=true", "config.roles.user.allow[0]=market:*"],
    ],
    ids=["acknowledged", "auth-required", "narrow-anonymous-role"],
)
def test_an_exposed_install_renders_once_open_access_is_addressed(
    helm: Helm, sets: list[str]
) -> None:
    proc = template(helm, *(arg for value in sets for arg in ("--set", value)))
    assert proc.returncode == 0, proc.stderr


def test_allowed_origins_is_a_first_class_value(helm: Helm) -> None:
    manifests = render(
        helm,
        "--set", "gateway.allowedOrigins[0]=https://ui.example.com",
        "--set", "gateway.allowedOrigins[1]=https://ops.example.com:8443",
    )  # fmt: skip
    assert settings(manifests)["ALLOWED_ORIGINS"] == (
        "https://ui.example.com,https://ops.example.com:8443"
    )
    assert "ALLOWED_ORIGINS" not in settings(render(helm))
    proc = template(helm, "--set", "gateway.allowedOrigins[0]=https://ui.example.com/app")
    assert proc.returncode != 0 and SCHEMA_ERROR in proc.stderr


@pytest.mark.parametrize("values", [None, PRODUCTION_VALUES], ids=["default", "production"])
def test_grace_period_leaves_a_margin_past_the_shutdown_timeout(
    helm: Helm, values: Path | None
) -> None:
    manifests = render(helm, *(["-f", str(values)] if values else []))
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    pre_stop = int(gateway_container(manifests)["lifecycle"]["preStop"]["exec"]["command"][1])
    hard_bound = float(settings(manifests)["SHUTDOWN_TIMEOUT_SECONDS"])
    # The gateway's exit after its bound (closing Redis, the runners) takes
    # time too: SIGKILL exactly at the bound would cut it.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + hard_bound + 5


def test_otlp_protocols_the_image_cannot_speak_are_refused_by_the_schema(helm: Helm) -> None:
    for protocol in ("grpc", "http/json"):
        proc = template(helm, "--set", f"tracing.otlpProtocol={protocol}")
        assert proc.returncode != 0 and SCHEMA_ERROR in proc.stderr
