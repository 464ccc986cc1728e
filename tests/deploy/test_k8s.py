"""deploy/k8s: the kustomize base and its overlays, as `kubectl kustomize` renders them.

Every object is checked against Kubernetes' own OpenAPI schema, offline (kubernetes-validate,
strict: an unknown or misplaced field fails), and the manifests against the code they deploy:
the probes and the scrape path are routes of the gateway's Flask app, the ConfigMap's file loads
with the gateway's own settings loader (under the environment the pod gets), its recommender
URLs reach the overlay's mock recommenders, the grace period outlasts a worker's shutdown. The
with-feedback overlay's store is its Redis, which a real redis-server started with the
manifest's arguments serves to the gateway's own store, and its salt comes from a Secret.
"""

from __future__ import annotations

import ast
import base64
import math
import os
import shlex
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from gunicorn.config import Config as GunicornConfig
from kubernetes_validate.utils import all_versions, latest_version
from werkzeug.routing import MapAdapter

from gateway.config.settings import ENV_PREFIX, Settings, config_file, load_settings
from gateway.feedback.impressions import FeedbackEvent, Impression, ShownItem
from gateway.feedback.records import EventResult, LearnedWeights
from gateway.feedback.store import open_store
from gateway.web import ops
from gateway.web.app import create_app
from gateway.web.flask_app import view_limit_s
from mock_recommenders.__main__ import parse_arguments
from mock_recommenders.server import KEEPALIVE_TIMEOUT_S, Recommender
from tests.helpers import ROOT
from tests.redis_server import RedisServer
from tests.tools import require_tool

# ~3 s: kubectl three times, the schemas of two Kubernetes versions, the mocks' synthetic world,
# a redis-server.
pytestmark = pytest.mark.slow

K8S = ROOT / "deploy" / "k8s"
OVERLAY = K8S / "overlays" / "with-mocks"
FEEDBACK = K8S / "overlays" / "with-feedback"
KSERVE = K8S / "overlays" / "with-kserve"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# The oldest and the newest schema kubernetes-validate bundles: valid on every Kubernetes
# between them (the manifests need 1.23+, for autoscaling/v2 and policy/v1).
SCHEMA_VERSIONS = sorted(
    {min(all_versions(), key=_version_key), latest_version()}, key=_version_key
)

BASE_KINDS = {
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "Secret",
    "Service",
}
GATEWAY = "fusion-gateway"  # the gateway's Deployment, Service, autoscaler and budget
CONFIG_VARIABLE = f"{ENV_PREFIX}CONFIG"
API_KEYS_VARIABLE = f"{ENV_PREFIX}API_KEYS"
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
SALT_VARIABLE = f"{ENV_PREFIX}FEEDBACK__SALT"
FEEDBACK_REDIS = "feedback-redis"

Manifest = dict[str, Any]


@dataclass
class Rendered:
    """The objects of one kustomization, as kubectl renders them."""

    objects: list[Manifest]
    scratch: Path  # where the pod's config file is written to be loaded

    @cached_property
    def settings(self) -> Settings:
        """The settings the gateway's pod loads: its environment, its mounted config file."""
        return _pod_settings(self)

    def of_kind(self, kind: str) -> list[Manifest]:
        """Every object of `kind`."""
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> Manifest:
        """The object of `kind` named `name`; fails the test if there is none."""
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]


def _render(directory: Path, scratch: Path) -> Rendered:
    kubectl = require_tool("kubectl")
    completed = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, f"kubectl kustomize {directory}: {completed.stderr}"
    objects = [doc for doc in yaml.safe_load_all(completed.stdout) if doc is not None]
    return Rendered(objects, scratch)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """`kubectl kustomize deploy/k8s`: the gateway alone."""
    return _render(K8S, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """`kubectl kustomize deploy/k8s/overlays/with-mocks`: the gateway and four mocks."""
    return _render(OVERLAY, tmp_path_factory.mktemp("overlay"))


@pytest.fixture(scope="module")
def feedback(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """`kubectl kustomize deploy/k8s/overlays/with-feedback`: with-mocks, Redis, feedback on."""
    return _render(FEEDBACK, tmp_path_factory.mktemp("feedback"))


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """`kubectl kustomize deploy/k8s/overlays/with-kserve`: the gateway before model servers."""
    return _render(KSERVE, tmp_path_factory.mktemp("kserve"))


@pytest.fixture(params=["base", "overlay", "feedback", "kserve"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """Each of the four renderings in turn."""
    value: Rendered = request.getfixturevalue(request.param)
    return value


# --- reading a pod as the kubelet would -----------------------------------------------------


def _pod(deployment: Manifest) -> Manifest:
    pod: Manifest = deployment["spec"]["template"]
    return pod


def _container(deployment: Manifest) -> Manifest:
    containers = _pod(deployment)["spec"]["containers"]
    assert len(containers) == 1, "one container per pod"
    container: Manifest = containers[0]
    return container


def _port_number(container: Manifest, port: int | str) -> int:
    """The number of `port` (a number or a name) among `container`'s ports; fails if absent."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            number: int = declared["containerPort"]
            return number
    raise AssertionError(f"port {port!r} is not a port of container {container['name']}")


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _env(rendered: Rendered, container: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet sets it: Secrets read, resources resolved."""
    assert "envFrom" not in container, "this test reads `env` only"
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        name = variable["name"]
        source = variable.get("valueFrom")
        if source is None:
            env[name] = variable.get("value", "")
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = rendered.one("Secret", ref["name"])
            assert ref["key"] in secret["data"], f"{name}: no key {ref['key']} in the Secret"
            env[name] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref.get("containerName", container["name"]) == container["name"]
            kind, resource = ref["resource"].split(".")
            assert resource == "cpu", f"{name}: this test reads CPU quantities only"
            quantity = container["resources"][kind][resource]
            env[name] = str(math.ceil(_cpu(quantity) / _cpu(ref.get("divisor", 1))))
        else:
            raise AssertionError(f"{name}: a source this test does not read: {source}")
    return env


def _mounted_file(rendered: Rendered, deployment: Manifest, path: str) -> str:
    """The contents a file at `path` has in the pod, from the ConfigMap volume mounted there."""
    container = _container(deployment)
    volumes = {v["name"]: v for v in _pod(deployment)["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(directory):
            continue
        source = volumes[mount["name"]].get("configMap")
        assert source is not None, f"{path} is mounted from a volume that is not a ConfigMap"
        key = path[len(directory) :]
        for item in source.get("items", []):
            if item["path"] == key:
                key = item["key"]
        config_map = rendered.one("ConfigMap", source["name"])
        assert key in config_map["data"], f"{path}: no key {key} in ConfigMap {source['name']}"
        data: str = config_map["data"][key]
        return data
    raise AssertionError(f"nothing is mounted at {path}")


def _pod_settings(rendered: Rendered) -> Settings:
    deployment = rendered.one("Deployment", GATEWAY)
    env = _env(rendered, _container(deployment))
    assert CONFIG_VARIABLE in env, f"the pod does not set {CONFIG_VARIABLE}"
    local = rendered.scratch / Path(env[CONFIG_VARIABLE]).name
    local.write_text(_mounted_file(rendered, deployment, env[CONFIG_VARIABLE]))
    env[CONFIG_VARIABLE] = str(local)
    with pytest.MonkeyPatch.context() as patch:
        for variable in list(os.environ):
            if variable.upper().startswith(ENV_PREFIX):
                patch.delenv(variable)
        for name, value in env.items():
            patch.setenv(name, value)
        assert config_file() == local, f"the gateway does not read {CONFIG_VARIABLE}"
        return load_settings()


@pytest.fixture(scope="module")
def gateway_routes(base: Rendered) -> Iterator[MapAdapter]:
    """The gateway app's routes, built from the pod's settings."""
    app = create_app(base.settings)
    yield app.url_map.bind("gateway.test")
    app.runtime.close()


def _endpoint(urls: MapAdapter, path: str, method: str = "GET") -> str:
    endpoint, _ = urls.match(path, method=method)
    return str(endpoint)


def _view(function: Any) -> str:
    return f"{ops.blueprint.name}.{function.__name__}"


def _mock_routes(name: str) -> set[tuple[str, str]]:
    """(method, path) of every route the mock recommender `name` serves."""
    router = Recommender(name).application().router
    return {
        (route.method, resource.canonical) for resource in router.resources() for route in resource
    }


def _graceful_timeout_s(env: dict[str, str]) -> float:
    """gunicorn's graceful_timeout in the pod: GUNICORN_CMD_ARGS, else gunicorn.conf.py's."""
    flags = GunicornConfig().parser().parse_args(shlex.split(env.get("GUNICORN_CMD_ARGS", "")))
    if flags.graceful_timeout is not None:
        return float(flags.graceful_timeout)
    module = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    for statement in module.body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "graceful_timeout" for t in statement.targets
        ):
            return float(ast.literal_eval(statement.value))
    return float(GunicornConfig().graceful_timeout)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- the tests ------------------------------------------------------------------------------


def test_every_object_is_valid_kubernetes(rendered: Rendered) -> None:
    kinds = {o["kind"] for o in rendered.objects}
    assert kinds >= BASE_KINDS, f"missing: {BASE_KINDS - kinds}"
    errors = []
    for version in SCHEMA_VERSIONS:
        for manifest in rendered.objects:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except (
                kubernetes_validate.ValidationError,
                kubernetes_validate.SchemaNotFoundError,
            ) as exc:
                what = f"{manifest['kind']} {manifest['metadata']['name']}"
                errors.append(f"{version} {what}: {str(exc).splitlines()[0]}")
    assert not errors, "\n".join(errors)


def test_the_base_has_the_gateway_alone_and_the_overlay_adds_the_mocks(
    base: Rendered, overlay: Rendered
) -> None:
    assert {o["kind"] for o in base.objects} == BASE_KINDS
    assert [d["metadata"]["name"] for d in base.of_kind("Deployment")] == [GATEWAY]
    in_overlay = {(o["kind"], o["metadata"]["name"]) for o in overlay.objects}
    assert {(o["kind"], o["metadata"]["name"]) for o in base.objects} <= in_overlay
    # The mocks run the gateway's image, tagged like it (a bare name would mean :latest).
    images = {_container(d)["image"] for d in overlay.of_kind("Deployment")}
    assert images == {_container(base.one("Deployment", GATEWAY))["image"]}
    assert ":" in images.pop()


def test_probes_ask_the_gateway_endpoints_made_for_them(
    base: Rendered, gateway_routes: MapAdapter
) -> None:
    container = _container(base.one("Deployment", GATEWAY))
    probes = {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }
    assert _endpoint(gateway_routes, probes["readinessProbe"]) == _view(ops.readyz)
    # Liveness asks only whether the process answers: a restart would cure nothing else.
    assert _endpoint(gateway_routes, probes["livenessProbe"]) == _view(ops.healthz)
    if "startupProbe" in probes:
        assert _endpoint(gateway_routes, probes["startupProbe"]) == _view(ops.healthz)


def test_probes_service_and_scrape_all_reach_the_container_port(rendered: Rendered) -> None:
    deployment = rendered.one("Deployment", GATEWAY)
    container = _container(deployment)
    listening = {p["containerPort"] for p in container["ports"]}
    assert len(listening) == 1
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            assert _port_number(container, container[kind]["httpGet"]["port"]) in listening
    service = rendered.one("Service", GATEWAY)
    for port in service["spec"]["ports"]:
        assert _port_number(container, port.get("targetPort", port["port"])) in listening
    annotations = _pod(deployment)["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) in listening


def test_prometheus_can_scrape_the_metrics_endpoint(
    base: Rendered, gateway_routes: MapAdapter
) -> None:
    annotations = _pod(base.one("Deployment", GATEWAY))["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert _endpoint(gateway_routes, annotations["prometheus.io/path"]) == _view(
        ops.metrics_endpoint
    )
    # A scrape by annotation sends no X-Api-Token.
    assert base.settings.metrics
    assert not base.settings.metrics_require_token


def test_each_stage_of_stopping_ends_before_the_next_one_kills_it(rendered: Rendered) -> None:
    deployment = rendered.one("Deployment", GATEWAY)
    container = _container(deployment)
    settings = rendered.settings
    # A worker told to stop answers what comes on its idle connections for drain_s; a request
    # that came last runs as long as a view may (its deadline, or a /feedback's store wait).
    worker_s = settings.http.drain_s + view_limit_s(settings)
    if settings.feedback.enabled:  # then it writes its last impressions, retried a while
        worker_s += settings.feedback.stop_within_ms / 1000
    graceful_s = _graceful_timeout_s(_env(rendered, container))
    assert worker_s < graceful_s, "gunicorn would kill a worker still serving"
    # The kubelet sends SIGTERM once the preStop pause is over, and SIGKILL at the grace period.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert Path(command[0]).name == "sleep" and len(command) == 2, command
    pause_s = float(command[1])
    assert pause_s > 0
    grace_s = _pod(deployment)["spec"]["terminationGracePeriodSeconds"]
    assert pause_s + graceful_s < grace_s, "the kubelet would kill gunicorn mid-shutdown"


def test_the_config_points_at_the_overlays_mock_recommenders(overlay: Rendered) -> None:
    deployments = overlay.of_kind("Deployment")
    for recommender in overlay.settings.recommenders:
        for replica in recommender.replicas:
            url = urllib.parse.urlsplit(replica)
            host = url.hostname or ""
            # A short name resolves in the pod's own namespace, whichever that is.
            assert "." not in host, f"{recommender.name}: {host} is not a Service's short name"
            service = overlay.one("Service", host)
            port = url.port or 80
            [service_port] = [p for p in service["spec"]["ports"] if p["port"] == port]
            selector = service["spec"]["selector"]
            [backend] = [
                d for d in deployments if _selects(selector, _pod(d)["metadata"]["labels"])
            ]
            container = _container(backend)
            container_port = _port_number(container, service_port.get("targetPort", port))
            # The mock's own command line: it serves this name on this port, on every address.
            arguments = parse_arguments(container["args"])
            assert container["command"][-2:] == ["-m", "mock_recommenders"]
            assert arguments.plan == [(recommender.name, container_port)]
            assert arguments.host == "0.0.0.0"
            served = _mock_routes(recommender.name)
            assert ("POST", url.path) in served, f"{recommender.name}: no POST {url.path}"
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container[kind]
                assert _port_number(container, probe["httpGet"]["port"]) == container_port
                assert ("GET", probe["httpGet"]["path"]) in served, f"{recommender.name}: {kind}"
    # The gateway, not the mock, closes an idle connection (see gateway/config/settings.py: pool).
    assert overlay.settings.pool.keepalive_timeout_s < KEEPALIVE_TIMEOUT_S


def test_each_service_budget_and_spread_selects_exactly_its_own_pods(rendered: Rendered) -> None:
    deployments = rendered.of_kind("Deployment")

    def selected(selector: dict[str, str]) -> list[str]:
        return [
            d["metadata"]["name"]
            for d in deployments
            if _selects(selector, _pod(d)["metadata"]["labels"])
        ]

    for deployment in deployments:
        assert selected(deployment["spec"]["selector"]["matchLabels"]) == [
            deployment["metadata"]["name"]
        ]
        for spread in _pod(deployment)["spec"].get("topologySpreadConstraints", []):
            assert selected(spread["labelSelector"]["matchLabels"]) == [
                deployment["metadata"]["name"]
            ]
    for service in rendered.of_kind("Service"):
        assert selected(service["spec"]["selector"]) == [service["metadata"]["name"]]
    [budget] = rendered.of_kind("PodDisruptionBudget")
    assert selected(budget["spec"]["selector"]["matchLabels"]) == [GATEWAY]
    gateway = rendered.one("Deployment", GATEWAY)
    assert _pod(gateway)["spec"].get("topologySpreadConstraints"), "the gateway is not spread"


def test_the_autoscaler_alone_sets_the_gateways_replicas(rendered: Rendered) -> None:
    deployment = rendered.one("Deployment", GATEWAY)
    [autoscaler] = rendered.of_kind("HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    # A count in the Deployment would undo the autoscaler's on every `kubectl apply`.
    assert "replicas" not in deployment["spec"]
    # CPU utilisation is measured against the request.
    assert [m["resource"]["name"] for m in autoscaler["spec"]["metrics"]] == ["cpu"]
    assert _cpu(_container(deployment)["resources"]["requests"]["cpu"]) > 0
    # The budget lets one pod go at a time; the autoscaler's minimum keeps another serving.
    [budget] = rendered.of_kind("PodDisruptionBudget")
    assert autoscaler["spec"]["minReplicas"] > budget["spec"]["maxUnavailable"]


def test_the_api_keys_come_from_the_secret(base: Rendered) -> None:
    # The variable the gateway reads for its `api_keys` setting.
    assert "api_keys" in Settings.model_fields
    container = _container(base.one("Deployment", GATEWAY))
    [variable] = [v for v in container["env"] if v["name"] == API_KEYS_VARIABLE]
    ref = variable["valueFrom"]["secretKeyRef"]
    # The generated Secret's name carries a hash; kustomize must have rewritten the reference.
    [secret] = base.of_kind("Secret")
    assert ref["name"] == secret["metadata"]["name"]
    value = base64.b64decode(secret["data"][ref["key"]]).decode()
    keys = [key.get_secret_value() for key in base.settings.api_keys]
    assert keys and keys == value.split(",")


def test_the_config_file_loads_and_is_the_generated_configmap(base: Rendered) -> None:
    deployment = base.one("Deployment", GATEWAY)
    [config_map] = base.of_kind("ConfigMap")
    volumes = [v for v in _pod(deployment)["spec"]["volumes"] if "configMap" in v]
    assert [v["configMap"]["name"] for v in volumes] == [config_map["metadata"]["name"]]
    # Not the packaged defaults, which call the recommenders on loopback.
    hosts = {urllib.parse.urlsplit(r.replicas[0]).hostname for r in base.settings.recommenders}
    assert hosts.isdisjoint({"127.0.0.1", "localhost"})


def test_the_metrics_directory_is_an_in_memory_volume(rendered: Rendered) -> None:
    deployment = rendered.one("Deployment", GATEWAY)
    container = _container(deployment)
    directory = _env(rendered, container)[METRICS_DIR_VARIABLE]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert not mount.get("readOnly", False)
    [volume] = [v for v in _pod(deployment)["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_workers_follow_the_cpu_limit(rendered: Rendered) -> None:
    container = _container(rendered.one("Deployment", GATEWAY))
    workers = int(_env(rendered, container)["WEB_CONCURRENCY"])
    assert workers == math.ceil(_cpu(container["resources"]["limits"]["cpu"]))


def test_no_service_links_reach_the_gateways_environment(rendered: Rendered) -> None:
    # Each Service in the namespace would otherwise add <NAME>_PORT and the like; a Service
    # named `gateway` would add GATEWAY_PORT, which the gateway refuses as an unknown setting.
    pod = _pod(rendered.one("Deployment", GATEWAY))["spec"]
    assert pod["enableServiceLinks"] is False


def test_every_container_runs_unprivileged_on_a_read_only_root(rendered: Rendered) -> None:
    for deployment in rendered.of_kind("Deployment"):
        pod = _pod(deployment)["spec"]
        for container in pod["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            security = pod.get("securityContext", {}) | container.get("securityContext", {})
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 1) != 0, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            # What still writes: Python's tempfile, and gunicorn's control socket (the image's
            # XDG_RUNTIME_DIR is /tmp).
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert "/tmp" in writable, where
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) >= {"cpu", "memory"}, where


# --- feedback -------------------------------------------------------------------------------


def test_feedback_is_off_but_in_the_feedback_overlay(
    base: Rendered, overlay: Rendered, feedback: Rendered
) -> None:
    assert not base.settings.feedback.enabled
    assert not overlay.settings.feedback.enabled
    settings = feedback.settings.feedback
    assert settings.enabled
    # Every pod shares the store: Redis, not an SQLite file in one pod.
    assert urllib.parse.urlsplit(settings.store or "").scheme == "redis"
    # The learnt weights are used, and the interleaved arm feeds the learner.
    arms = {arm.name: (arm.fusion, arm.weights) for arm in settings.experiments.arms}
    assert arms == {"learned": ("rrf", "learned"), "explore": ("interleave", None)}
    assert settings.learner.enabled and not settings.learner.frozen
    in_overlay = {(o["kind"], o["metadata"]["name"]) for o in overlay.objects}
    added = {(o["kind"], o["metadata"]["name"]) for o in feedback.objects} - in_overlay
    assert {(kind, FEEDBACK_REDIS) for kind in ("Deployment", "Service")} <= added


def test_the_salt_comes_from_a_secret(feedback: Rendered) -> None:
    container = _container(feedback.one("Deployment", GATEWAY))
    [variable] = [v for v in container["env"] if v["name"] == SALT_VARIABLE]
    # Never a literal in the pod spec, which anyone who may read Deployments can read.
    assert "value" not in variable
    ref = variable["valueFrom"]["secretKeyRef"]
    # The generated name carries a hash: kustomize must have rewritten the reference.
    secret = feedback.one("Secret", ref["name"])
    salt = base64.b64decode(secret["data"][ref["key"]]).decode()
    loaded = feedback.settings.feedback.salt
    assert loaded is not None and loaded.get_secret_value() == salt


def _redis_container(rendered: Rendered) -> Manifest:
    """The Redis the gateway's store URL names: its Service's one backend's container."""
    store = urllib.parse.urlsplit(rendered.settings.feedback.store or "")
    host = store.hostname or ""
    assert "." not in host, f"{host} is not a Service's short name"
    service = rendered.one("Service", host)
    [service_port] = [p for p in service["spec"]["ports"] if p["port"] == (store.port or 6379)]
    selector = service["spec"]["selector"]
    [backend] = [
        d
        for d in rendered.of_kind("Deployment")
        if _selects(selector, _pod(d)["metadata"]["labels"])
    ]
    container = _container(backend)
    # The port the Service sends to is the one redis-server listens on.
    listening = container["args"][container["args"].index("--port") + 1]
    assert _port_number(container, service_port["targetPort"]) == int(listening)
    return container


def test_the_feedback_redis_serves_the_gateways_store(feedback: Rendered, tmp_path: Path) -> None:
    container = _redis_container(feedback)
    assert container["command"] == ["redis-server"]
    # Its data and its scratch are the only places it writes on its read-only root.
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert container["args"][container["args"].index("--dir") + 1] in writable
    with RedisServer.served_with(container["args"], tmp_path) as server:
        # The readiness probe's command, on this port.
        probe = container["readinessProbe"]["exec"]["command"]
        probe = [require_tool(probe[0]), *probe[1:]]
        probe[probe.index("-p") + 1] = str(server.port)
        answer = subprocess.run(probe, capture_output=True, text=True, timeout=10, check=False)
        assert answer.stdout.strip() == "PONG", answer
        # A full Redis refuses writes rather than evicting the counters; the append-only file
        # keeps them over a restart of the container.
        client = redis.Redis.from_url(server.url(), decode_responses=True)
        try:
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert client.config_get("appendonly") == {"appendonly": "yes"}
        finally:
            client.close()
        _store_round_trip(feedback.settings.feedback.store or "", server.port)


def _store_round_trip(url: str, port: int) -> None:
    """The gateway's own store, on the pod's URL moved to the loopback `port`: it works."""
    parts = urllib.parse.urlsplit(url)
    store = open_store(parts._replace(netloc=f"127.0.0.1:{port}").geturl(), retention_s=3600)
    try:
        shown = (ShownItem("i1", 1, None, ("sml",)),)
        store.save_impressions([Impression("r1", time.time(), "learned", shown)])
        click = FeedbackEvent("r1", "i1", "click", "e1")
        assert store.record([click, click]) == [EventResult.ACCEPTED, EventResult.DUPLICATE]
        assert store.stats().events == {"click": 1}
        learned = LearnedWeights({"sml": 1.5}, evidence=120, updated_at=time.time(), version=1)
        assert store.save_weights(learned)
        assert store.load_weights() == learned
    finally:
        store.close()


def test_the_kserve_overlay_calls_model_servers_in_their_protocols(
    kserve: Rendered, base: Rendered
) -> None:
    settings = kserve.settings
    assert [(r.name, r.protocol) for r in settings.recommenders] == [
        ("als-v1", "kserve-v1"),
        ("als-v2", "open-inference"),
        ("mlserver", "open-inference"),
    ]
    assert [r.readiness_urls() for r in settings.recommenders] == [
        ["http://als-predictor.models.svc.cluster.local/v1/models/als"],
        ["http://als-predictor.models.svc.cluster.local/v2/models/als/ready"],
        ["http://recsys-mlserver.models.svc.cluster.local:8080/v2/models/recsys/ready"],
    ]
    names = settings.recommenders[2].open_inference
    assert names is not None and (names.user_input, names.scores_output) == ("user", "relevance")
    # Only the config differs from the base: one ConfigMap, the base's replaced.
    [config_map] = kserve.of_kind("ConfigMap")
    assert config_map["metadata"]["name"].startswith("fusion-gateway-config-")
    assert sorted(o["kind"] for o in kserve.objects) == sorted(o["kind"] for o in base.objects)
    assert not settings.readiness.probe_recommenders
