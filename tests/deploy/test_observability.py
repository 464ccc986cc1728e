"""The observability kit in deploy/observability: rules and alerts, Prometheus, Grafana.

promtool checks the rules and runs their unit tests (`gateway.rules.test.yml`), and checks the
Prometheus config; the dashboard's JSON is checked for what Grafana needs of it. Then a real
Prometheus scrapes a real gateway (gunicorn, two workers, one recommender failing, a burst that
fills the admission queues, a few of it waiting and served, the rest shed; feedback on an SQLite
store with a click, a duplicate and an unknown request): every recording rule, alert and
dashboard query must evaluate there, and every recording rule and panel must show data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from mock_recommenders import MockFleetProcess
from mock_recommenders.loopback import loopback_socket, port_of
from mock_recommenders.process import stop_process
from tests.helpers import ROOT, gunicorn, post_concurrently, wait_until
from tests.tools import require_tool

KIT = ROOT / "deploy" / "observability"
RULES = KIT / "gateway.rules.yml"
RULE_TESTS = KIT / "gateway.rules.test.yml"
PROMETHEUS_CONFIG = KIT / "prometheus.yml"
DASHBOARD = KIT / "grafana" / "dashboards" / "fusion-gateway.json"
DATASOURCES = KIT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = KIT / "grafana" / "provisioning" / "dashboards" / "fusion-gateway.yml"

# Where compose mounts the files (compose.yaml).
MOUNTED_RULES = "/etc/prometheus/gateway.rules.yml"
MOUNTED_DASHBOARDS = "/var/lib/grafana/dashboards"

# What Grafana puts in place of its own variables when it sends a panel's query.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
# ${name}, ${name:format}, $name, [[name]].
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; its output, stdout and stderr together."""
    return subprocess.run(
        [require_tool("promtool"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )


def rules() -> list[dict[str, Any]]:
    """Every rule of gateway.rules.yml, recording rules and alerts."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard."""
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """The dashboard's panels that show data (not its rows)."""
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def variables_in(text: str) -> set[str]:
    """The names of the Grafana variables that `text` refers to."""
    return {next(name for name in match.groups() if name) for match in VARIABLE.finditer(text)}


def substitute(text: str, values: dict[str, str]) -> str:
    """`text` with every Grafana variable replaced as Grafana would, from `values`."""

    def value(match: re.Match[str]) -> str:
        return values[next(name for name in match.groups() if name)]

    return VARIABLE.sub(value, text)


# --- promtool -------------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))

    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout
    # Each alert is tested.
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for group in tests for t in group.get("alert_rule_test", [])}
    assert tested == {rule["alert"] for rule in rules() if "alert" in rule}


def test_the_prometheus_config_is_valid_and_loads_the_rules(tmp_path: Path) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [MOUNTED_RULES]
    [job] = config["scrape_configs"]
    # GatewayDown selects `up{job="gateway"}`.
    assert job["job_name"] == "gateway"
    assert job["static_configs"] == [{"targets": ["gateway:5000"]}]

    # promtool reads the rule files the config names: here, a copy in place of the mount.
    (tmp_path / "gateway.rules.yml").write_text(RULES.read_text())
    config["rule_files"] = [str(tmp_path / "gateway.rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))

    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


# --- The dashboard --------------------------------------------------------------------------


def test_the_dashboard_queries_the_provisioned_datasource() -> None:
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["options"]["path"] == MOUNTED_DASHBOARDS

    expected = {"type": "prometheus", "uid": datasource["uid"]}
    for panel in panels():
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for variable in dashboard()["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["schemaVersion"] >= 39
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), ids
    titles = [panel["title"] for panel in panels()]
    assert len(titles) == len(set(titles)), titles

    # Every variable a query uses is defined; the built-ins are Grafana's own.
    defined = {variable["name"] for variable in board["templating"]["list"]}
    for panel in panels():
        for target in panel["targets"]:
            used = {name for name in variables_in(target["expr"]) if not name.startswith("__")}
            assert used <= defined, f"{panel['title']!r}: {used - defined} undefined"
    for variable in board["templating"]["list"]:
        assert variables_in(variable["query"]) <= defined, variable["name"]

    # Grafana moves overlapping panels; none overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_the_dashboard_uses_only_recorded_series_that_the_rules_record() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for panel in panels():
        for target in panel["targets"]:
            # A name with a colon is a recording rule's.
            used = set(re.findall(r"\b[a-z_]+:[a-z_0-9:]+\b", target["expr"]))
            assert used <= recorded, f"{panel['title']!r}: {used - recorded} not recorded"


# --- A real Prometheus in front of a real gateway -------------------------------------------


@pytest.mark.slow
def test_prometheus_evaluates_every_rule_and_panel_on_a_live_gateway(
    fleet_process: MockFleetProcess, tmp_path: Path
) -> None:
    executable = require_tool("prometheus")
    fleet_process.set_behaviour(delay_ms=50)
    fleet_process.set_behaviour("trd", status=500)  # its breaker opens
    # Two requests at once per worker and 4 waiting: of a burst of 40, a few wait and are
    # served, most are shed for a full queue. Feedback on, so that its series exist:
    # impressions of every answer, the learnt weights (the writer learns once at start), the
    # events sent below.
    overrides = {
        "GATEWAY_MAX_IN_FLIGHT": "2",
        "GATEWAY_ADMISSION__QUEUE_SIZE": "4",
        "GATEWAY_FEEDBACK__STORE": f"sqlite:///{tmp_path / 'feedback.db'}",
        "GATEWAY_FEEDBACK__SALT": "observability-test-salt",
    }
    with (
        gunicorn(fleet_process, "--workers", "2", **overrides) as server,
        steady_load(server.url),
        running_prometheus(executable, scrape_config(server.url, tmp_path), tmp_path) as api,
    ):
        wait_until(lambda: bool(query(api, 'up{job="gateway"} == 1')), 30, "never scraped")
        # Twice, so that the counters move while Prometheus watches: a series born with its
        # value has a rate of 0 (each shed reason's series is born with its first shed), and
        # the shed and store-failure ratios would be 0.
        shed_a_burst(server.url)
        wait_until(lambda: bool(query(api, "gateway_shed_requests_total")), 30, "shed unseen")
        shed_a_burst(server.url)
        give_feedback(server.url, "1")
        wait_until(lambda: bool(query(api, sum_of_events("click", "accepted", 1))), 30, "unseen")
        give_feedback(server.url, "2")
        empty = poll(api, live_checks(), timeout_s=30)
        for alert in (rule for rule in rules() if "alert" in rule):
            query(api, alert["expr"])  # it need not fire, only evaluate
        unhealthy = unhealthy_rules(api)
        blamed = query(api, 'ALERTS{recommender=~"sml|asc|psn"}')
        errors = query(api, 'ALERTS{alertname="GatewayHighErrorRatio"}')
        feedback_alerts = query(api, 'ALERTS{alertname=~"GatewayFeedback.*"}')

    assert not empty, "these returned nothing within 30 s:\n" + "\n".join(empty)
    assert not unhealthy, unhealthy
    # Healthy recommenders are not blamed, and shed requests are not errors.
    assert not blamed, blamed
    assert not errors, errors
    # A store that works drops nothing and fails nothing.
    assert not feedback_alerts, feedback_alerts


def live_checks() -> dict[str, str]:
    """What must return data from the live gateway's Prometheus, by what it checks."""
    checks = {f"recording rule {r['record']}": r["expr"] for r in rules() if "record" in r}
    values = {"job": "gateway", "recommender": "(trd|sml)", **GRAFANA_BUILTINS}
    for panel in panels():
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            checks[f"panel {panel['title']!r}, query {target['refId']}"] = expr
    for variable in dashboard()["templating"]["list"]:
        # label_values(selector, label): the label's values on the selector's series.
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        assert match, variable["query"]
        selector, label = match.groups()
        expr = f"count by ({label}) ({substitute(selector, values)})"
        checks[f"variable {variable['name']}"] = expr
    failures = "recommender:gateway_recommender_failures:ratio_rate5m"
    checks |= {
        # What the load did, as the rules see it.
        "shedding is seen": "job:gateway_shed_requests:ratio_rate5m > 0",
        "shed for a full queue": 'sum(gateway_shed_requests_total{reason="queue_full"}) > 0',
        "waited, then served": (
            'sum(gateway_admission_queue_wait_seconds_count{outcome="admitted"}) > 0'
        ),
        "the queues' size, over both workers": "sum(gateway_admission_queue_capacity) == 8",
        "shed 503s are not errors": "job:gateway_request_errors:ratio_rate5m < 0.05",
        "trd's calls all fail": f'{failures}{{recommender="trd"}} == 1',
        "sml's calls succeed": f'{failures}{{recommender="sml"}} < 0.5',
        "trd's breaker alert": 'ALERTS{alertname="GatewayCircuitBreakerOpen", recommender="trd"}',
        "trd's failure alert": 'ALERTS{alertname="RecommenderFailing", recommender="trd"}',
        "the shedding alert": 'ALERTS{alertname="GatewayShedding"}',
        # What give_feedback sent twice, judged and counted, summed over the workers.
        "two clicks accepted": sum_of_events("click", "accepted", 2),
        "two duplicates": sum_of_events("click", "duplicate", 2),
        "two unknown requests": sum_of_events("purchase", "unknown_request", 2),
        "feedback events per second": "sum(kind_result:gateway_feedback_events:rate1m) > 0",
        "impressions recorded": 'gateway_feedback_impressions_total{outcome="recorded"} > 0',
        "no impression dropped": "job:gateway_feedback_impressions_dropped:ratio_rate5m == 0",
        "the store has not failed": "job:gateway_feedback_store_failures:ratio_rate5m == 0",
        "the learnt weights": 'count(gateway_feedback_learned_weight{recommender="sml"}) == 1',
    }
    return checks


def sum_of_events(kind: str, result: str, count: int) -> str:
    """A query that returns data when `count` events of `kind` were judged `result`."""
    return f'sum(gateway_feedback_events_total{{kind="{kind}", result="{result}"}}) == {count}'


def give_feedback(url: str, event_id: str) -> None:
    """A click on an answer's first item, the same click again, and a purchase never shown."""
    answer = requests.post(f"{url}/recommendation", json={"user_id": "u1"}, timeout=10)
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["X-Request-ID"]
    click = {"request_id": request_id, "item_id": answer.json()["fused"][0]["id"]}
    click |= {"event": "click", "event_id": event_id}
    unknown = {"request_id": "never-answered", "item_id": "i1", "event": "purchase"}
    statuses = [
        requests.post(f"{url}/feedback", json=event, timeout=10).status_code
        for event in (click, click, unknown)
    ]
    assert statuses == [202, 202, 404], statuses


def poll(api: str, checks: dict[str, str], timeout_s: float) -> list[str]:
    """Evaluate `checks` until each returns data; those that still do not after `timeout_s`."""
    give_up = time.monotonic() + timeout_s
    while True:
        empty = [f"{what}: {expr}" for what, expr in checks.items() if not query(api, expr)]
        if not empty or time.monotonic() > give_up:
            return empty
        time.sleep(0.5)  # Prometheus scrapes and evaluates once a second


def unhealthy_rules(api: str) -> list[str]:
    """The rules whose last evaluation failed, with Prometheus's error."""
    response = requests.get(f"{api}/api/v1/rules", timeout=10)
    response.raise_for_status()
    groups = response.json()["data"]["groups"]
    return [
        f"{rule['name']}: {rule.get('lastError')}"
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]


def query(api: str, expr: str) -> list[dict[str, Any]]:
    """The result of an instant query; an invalid one fails the test with Prometheus's error."""
    response = requests.get(f"{api}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def shed_a_burst(url: str) -> None:
    """Requests at once, far more than admitted, until some are shed."""

    def shed() -> bool:
        answers = asyncio.run(post_concurrently(url, [{}] * 40))
        return any(status == 503 for status, _ in answers)

    wait_until(shed, 30, "a burst of 40 requests at once was never shed")


@contextlib.contextmanager
def steady_load(url: str) -> Iterator[None]:
    """One request after another, a few a second, until the block ends."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{url}/recommendation", json={}, timeout=10)
            stop.wait(0.05)

    thread = threading.Thread(target=run, name="steady-load")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def scrape_config(gateway_url: str, tmp_path: Path) -> Path:
    """The compose stack's prometheus.yml, scraping `gateway_url` every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    (tmp_path / "gateway.rules.yml").write_text(RULES.read_text())
    config["rule_files"] = [str(tmp_path / "gateway.rules.yml")]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [gateway_url.removeprefix("http://")]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running_prometheus(executable: str, config: Path, tmp_path: Path) -> Iterator[str]:
    """Prometheus on a free loopback port; its base URL, once ready.

    Prometheus cannot listen on port 0 and report the port, so a free one is picked and handed
    over; if another process takes it first, Prometheus exits and another is tried.
    """
    for attempt in range(5):
        with loopback_socket() as probe:
            port = port_of(probe)
        log = tmp_path / f"prometheus-{attempt}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    executable,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / f'data-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        api = f"http://127.0.0.1:{port}"
        try:
            wait_until(
                lambda: process.poll() is not None or ready(api),  # noqa: B023
                30,
                lambda: f"prometheus did not become ready:\n{log.read_text()[-3000:]}",  # noqa: B023
            )
            if process.poll() is None:
                yield api
                return
        finally:
            stop_process(process)
        if "address already in use" not in log.read_text():
            raise AssertionError(f"prometheus stopped at start-up:\n{log.read_text()[-3000:]}")
    raise AssertionError("prometheus found no free port in 5 attempts")


def ready(api: str) -> bool:
    """Whether Prometheus at `api` serves queries."""
    try:
        return requests.get(f"{api}/-/ready", timeout=5).status_code == 200
    except requests.RequestException:
        return False
