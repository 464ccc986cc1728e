"""compose.yaml, checked against what its services are given: the image, the gateway's settings,
the mocks' command line, the feedback store's Redis (a real redis-server run with its command
line serves the gateway's store), and the files mounted into Prometheus and Grafana.

No container starts here (`make image-test` brings up the gateway and the mocks with
podman-compose); the names and ports that tie the services together are checked instead.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config.settings import load_settings
from gateway.feedback.store import open_store
from mock_recommenders import DEFAULT_NAMES
from mock_recommenders.__main__ import parse_arguments
from tests.helpers import ROOT
from tests.redis_server import RedisServer

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]
GATEWAY = SERVICES["gateway"]
# ${NAME:-default}: compose's interpolation, the default when NAME is unset in the shell.
INTERPOLATED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _dockerfile_value(pattern: str) -> str:
    match = re.search(pattern, DOCKERFILE, re.MULTILINE)
    assert match, f"no {pattern!r} in the Dockerfile"
    return match.group(1)


def _as_compose_gives(value: str) -> str:
    """`value` with each ${NAME:-default} replaced as compose does when NAME is unset."""
    return INTERPOLATED.sub(lambda match: match.group(2), value)


def _container_port(service: dict[str, Any]) -> int:
    """The one port the service publishes, inside its container."""
    (port,) = service["ports"]
    return int(port.rsplit(":", 1)[1])


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """The service's bind mounts: target in the container -> source in the repository."""
    mounts = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = ROOT / source
    return mounts


def _in_container(mounts: dict[str, Path], path: str) -> Path | None:
    """The repository file that `path`, in the container, is, through one of `mounts`."""
    for target, source in mounts.items():
        if PurePosixPath(path).is_relative_to(target):
            return source / PurePosixPath(path).relative_to(target)
    return None


def test_the_stack_is_the_gateway_its_mocks_redis_prometheus_and_grafana() -> None:
    assert set(SERVICES) == {"gateway", *DEFAULT_NAMES, "redis", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on {dependency}, which is no service"


@pytest.mark.parametrize("name", ["gateway", *DEFAULT_NAMES])
def test_the_gateway_and_the_mocks_are_one_image_built_from_the_dockerfiles_base(
    name: str,
) -> None:
    service = SERVICES[name]
    base = _dockerfile_value(r"^ARG BASE_IMAGE=(\S+)$")
    assert service["image"] == GATEWAY["image"] == "localhost/fusion-gateway:latest"
    assert service["build"] == {"context": ".", "args": {"BASE_IMAGE": f"${{BASE_IMAGE:-{base}}}"}}


def test_the_gateways_environment_is_settings_it_accepts(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    for variable, value in GATEWAY["environment"].items():
        clean_environment.setenv(variable, _as_compose_gives(value))
    settings = load_settings()  # an unknown GATEWAY_ variable, or a bad value, raises
    assert int(GATEWAY["environment"]["WEB_CONCURRENCY"]) >= 1
    # Every mock, under its service name and at the port its command line gives it.
    called = {r.name: urlsplit(str(r.url)) for r in settings.recommenders}
    assert list(called) == list(DEFAULT_NAMES)
    for name, url in called.items():
        mock = parse_arguments(SERVICES[name]["command"][3:])
        assert (url.hostname, url.port) == (name, mock.plan[0][1])


def test_the_gateways_metrics_directory_is_a_tmpfs() -> None:
    assert _dockerfile_value(r"PROMETHEUS_MULTIPROC_DIR=(\S+)") in GATEWAY["tmpfs"]


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_each_mock_serves_its_name_on_all_addresses_and_checks_that_port(name: str) -> None:
    command = SERVICES[name]["command"]
    assert command[:3] == ["python", "-m", "mock_recommenders"]
    mock = parse_arguments(command[3:])
    assert mock.host == "0.0.0.0"
    ((served, port),) = mock.plan
    assert served == name
    assert _container_port(SERVICES[name]) == port
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert f"http://127.0.0.1:{port}/stats" in test[-1]


def test_mounted_files_exist_in_the_repository() -> None:
    for name in ("prometheus", "grafana"):
        for target, source in _mounts(SERVICES[name]).items():
            assert source.exists(), f"{name}: {target} is mounted from {source}, which is missing"


def test_prometheus_scrapes_the_gateway_service_with_the_rules_mounted() -> None:
    mounts = _mounts(SERVICES["prometheus"])
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text("utf-8"))
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert f"gateway:{_container_port(GATEWAY)}" in targets
    for rule_file in config["rule_files"]:
        path = PurePosixPath("/etc/prometheus", rule_file)  # relative: to the config's directory
        assert _in_container(mounts, str(path)) is not None, f"{rule_file} is not mounted"


def test_grafana_reads_the_prometheus_service_and_the_mounted_dashboards() -> None:
    grafana = SERVICES["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text("utf-8")
    )["datasources"]
    prometheus = f"prometheus:{_container_port(SERVICES['prometheus'])}"
    assert [urlsplit(source["url"]).netloc for source in datasources] == [prometheus]
    for provider_file in (provisioning / "dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(provider_file.read_text("utf-8"))["providers"]:
            dashboards = _in_container(mounts, provider["options"]["path"])
            assert dashboards is not None and list(dashboards.glob("*.json"))
    home = _in_container(
        mounts, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    )
    assert home is not None and home.is_file()


def test_the_gateways_feedback_store_is_the_redis_service(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environment = GATEWAY["environment"]
    # The salt can be set from the shell without editing the file; the example is the default.
    assert INTERPOLATED.fullmatch(environment["GATEWAY_FEEDBACK__SALT"])
    for variable, value in environment.items():
        clean_environment.setenv(variable, _as_compose_gives(value))
    settings = load_settings().feedback
    assert settings.enabled and [arm.name for arm in settings.experiments.arms]
    store = urlsplit(settings.store or "")
    assert store.scheme == "redis"
    assert store.hostname in SERVICES and store.hostname in GATEWAY["depends_on"]
    redis = SERVICES[store.hostname]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert int(command[command.index("--port") + 1]) == (store.port or 6379)
    health = redis["healthcheck"]["test"]
    assert health[:2] == ["CMD", "redis-cli"] and health[-1] == "ping"
    assert int(health[health.index("-p") + 1]) == (store.port or 6379)
    # Its data in a volume the file declares.
    [data] = [v for v in redis["volumes"] if v.endswith(":/data")]
    assert data.split(":")[0] in COMPOSE["volumes"]
    # The command line a real redis-server accepts, and the gateway's store works on it.
    with RedisServer.served_with(command[1:], tmp_path) as server:
        local = open_store(server.url(int(store.path.strip("/") or 0)), retention_s=60)
        try:
            assert local.stats().impressions_stored == 0
            assert local.expire() == 0
        finally:
            local.close()
