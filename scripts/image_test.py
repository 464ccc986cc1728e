"""`make image-test`: build the container image, run it with podman, and check it as users will.

1. Builds the image (`scripts/image.sh build`), and checks that it holds exactly what uv.lock
   pins for the runtime and its two extras (`mocks`, `tracing`), version for version.
2. Runs the four mocks and the gateway in two containers of one pod, which has a network of
   its own, with the gateway's port published on a free loopback port here, and the gateway's
   root filesystem read-only as deploy/k8s has it: it answers with every source ok, serves its
   metrics, logs no error, passes its health check (run by hand: podman's timers need
   systemd), runs as an unprivileged user, and gunicorn is PID 1 (no shell between it and
   `podman stop`).
3. Stops the gateway (`podman stop`: SIGTERM) while a request waits on a slow mock: the request
   is answered in full, and gunicorn shuts down and exits 0.
4. Brings up compose.yaml's gateway and mocks with podman-compose (Redis, Prometheus and
   Grafana would need a registry; feedback is off without Redis): the gateway finds the mocks
   by service name, keeps its metrics on the tmpfs, and the mocks' health checks pass.

Prints a PASS or FAIL line per check and exits 1 if any failed. The pod, the containers and the
compose network it made are removed however it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import yaml
from packaging.markers import Marker
from packaging.utils import NormalizedName, canonicalize_name

from mock_recommenders import DEFAULT_NAMES

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/fusion-gateway:latest"
# Inside the pod, which has a network namespace of its own: the image's and the mocks' defaults.
GATEWAY_PORT = 5000
MOCK_PORTS = {name: 5001 + i for i, name in enumerate(DEFAULT_NAMES)}
METRICS_DIR = "/run/gateway/metrics"
# The call the gateway must still be waiting on when it is told to stop.
SLOW_MS = 1500
READY_WITHIN_S = 60.0
# The extras the Dockerfile installs; uv from `make install` reads the lock.
IMAGE_EXTRAS = ("mocks", "tracing")
UV = ROOT / ".uv" / "bin" / "uv"
# Printed by the image's Python: its distributions, and what PEP 508 markers are evaluated on.
_INSTALLED = """
import importlib.metadata, json, os, platform, sys
print(json.dumps({
    "installed": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()},
    "environment": {
        "implementation_name": sys.implementation.name,
        "implementation_version": platform.python_version(),
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_python_implementation": platform.python_implementation(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    },
}))
"""


class Failed(Exception):
    """A step could not go on; its checks after it are not run."""


class Report:
    """The PASS and FAIL lines, and whether any check failed."""

    def __init__(self) -> None:
        self.failures = 0

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        """Print one check's outcome; return it."""
        print(f"{'PASS' if ok else 'FAIL'} {what}{f' ({detail})' if detail else ''}", flush=True)
        self.failures += not ok
        return ok


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run podman; raise `Failed` with its error output when it fails and `check` is set."""
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise Failed(f"podman {' '.join(args[:2])} ...: {result.stderr.strip()[-2000:]}")
    return result


def logs(container: str) -> str:
    """The container's output, stdout and stderr together."""
    result = podman("logs", container, check=False)
    return result.stdout + result.stderr


def wait_until(condition: Callable[[], bool], within_s: float, what: str) -> None:
    """Poll `condition` until it holds; raise `Failed` naming `what` after `within_s`."""
    give_up = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > give_up:
            raise Failed(f"no {what} within {within_s:.0f} s")
        time.sleep(0.2)


def answers(url: str) -> bool:
    """Whether GET `url` is a 200 now."""
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_ready(gateway_url: str, container: str) -> None:
    """Wait for the gateway's /readyz; a container that exits meanwhile fails at once."""

    def ready() -> bool:
        state = podman("inspect", container, "--format", "{{.State.Status}}").stdout.strip()
        if state != "running":
            raise Failed(f"{container} is {state}:\n{logs(container)[-3000:]}")
        return answers(f"{gateway_url}/readyz")

    wait_until(ready, READY_WITHIN_S, f"answer from {gateway_url}/readyz")


def published(container: str, port: int) -> str:
    """The URL on this machine of the container's `port`."""
    address = podman("port", container, f"{port}/tcp").stdout.split()[0]
    return f"http://{address}"


def recommend(gateway_url: str) -> requests.Response:
    """The README's request."""
    return requests.post(f"{gateway_url}/recommendation", json={"user_id": "u1"}, timeout=30)


def check_answer(report: Report, what: str, response: requests.Response) -> None:
    """A 200 with every recommender's answer in it."""
    ok = response.status_code == 200
    if not report.check(f"{what}: status 200", ok, "" if ok else response.text[:500]):
        return
    statuses = {name: source["status"] for name, source in response.json()["sources"].items()}
    ok = statuses == dict.fromkeys(DEFAULT_NAMES, "ok")
    report.check(f"{what}: every source ok", ok, "" if ok else json.dumps(statuses))


def check_metrics(report: Report, what: str, gateway_url: str) -> None:
    """/metrics has the requests counted.

    Another worker than the one that served the request may answer: each worker hands its
    counts to the shared files once a second (gateway.metrics.FLUSH_EVERY_S), so this asks for
    a few seconds.
    """
    give_up_at = time.monotonic() + 10
    while True:
        counted = (
            "\ngateway_requests_total{" in requests.get(f"{gateway_url}/metrics", timeout=5).text
        )
        if counted or time.monotonic() > give_up_at:
            break
        time.sleep(0.5)
    report.check(f"{what}: /metrics counts gateway_requests_total", counted)


# --- 2 and 3: a pod ---------------------------------------------------------------------------


def run_pod(report: Report, pod: str) -> None:
    """The mocks and the gateway in one pod, checked, then the gateway stopped mid-request."""
    mocks, gateway = f"{pod}-mocks", f"{pod}-gateway"
    podman(
        *("pod", "create", "--name", pod),
        *("--publish", f"127.0.0.1::{GATEWAY_PORT}"),
        *("--publish", f"127.0.0.1::{MOCK_PORTS['sml']}"),
    )
    podman(
        *("run", "--detach", "--pod", pod, "--name", mocks, "--no-healthcheck", IMAGE),
        *("python", "-m", "mock_recommenders", "--host", "0.0.0.0"),
    )
    recommenders = [
        {"name": name, "url": f"http://127.0.0.1:{port}/test"} for name, port in MOCK_PORTS.items()
    ]
    podman(
        *("run", "--detach", "--pod", pod, "--name", gateway),
        # As deploy/k8s runs it: nothing written but to /tmp and the metrics directory, both
        # in memory.
        *("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp", "--tmpfs", METRICS_DIR),
        *("--env", f"GATEWAY_RECOMMENDERS={json.dumps(recommenders)}"),
        # Long enough for the slow call of the stop check.
        *("--env", "GATEWAY_DEADLINE_MS=10000"),
        *("--env", "WEB_CONCURRENCY=2"),
        IMAGE,
    )
    gateway_url = published(gateway, GATEWAY_PORT)
    sml_url = published(mocks, MOCK_PORTS["sml"])
    wait_until(
        lambda: logs(mocks).count("listening on") == len(DEFAULT_NAMES),
        READY_WITHIN_S,
        "mocks listening",
    )
    wait_ready(gateway_url, gateway)
    report.check("pod: the gateway is ready", True, gateway_url)

    check_answer(report, "pod: POST /recommendation", recommend(gateway_url))
    check_metrics(report, "pod", gateway_url)
    errors = [line for line in logs(gateway).splitlines() if "ERROR" in line]
    report.check("pod: the gateway logs no error", not errors, "\n".join(errors[:5]))
    health = podman("healthcheck", "run", gateway, check=False)
    report.check("the image's HEALTHCHECK passes", health.returncode == 0, health.stdout.strip())
    uid = podman("exec", gateway, "id", "-u").stdout.strip()
    report.check("the gateway runs as an unprivileged user", uid not in ("", "0"), f"uid {uid}")
    pid1 = podman("exec", gateway, "cat", "/proc/1/cmdline").stdout.split("\0")
    report.check(
        "gunicorn is PID 1",
        len(pid1) > 1 and pid1[1].endswith("/gunicorn"),
        " ".join(pid1).strip(),
    )
    stop_mid_request(report, gateway, gateway_url, sml_url)


def stop_mid_request(report: Report, gateway: str, gateway_url: str, sml_url: str) -> None:
    """`podman stop` while a request waits on sml: it is answered, and gunicorn exits 0."""
    slow = requests.put(f"{sml_url}/admin/behaviour", json={"delay_ms": SLOW_MS}, timeout=5)
    slow.raise_for_status()
    calls_before = requests.get(f"{sml_url}/stats", timeout=5).json()["requests"]
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["response"] = recommend(gateway_url)
        except requests.RequestException as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    request = threading.Thread(target=send)
    request.start()
    # The call has reached sml: the gateway is in the middle of the request.
    wait_until(
        lambda: requests.get(f"{sml_url}/stats", timeout=5).json()["requests"] > calls_before,
        10,
        "call reaching sml",
    )
    stop_at = time.monotonic()
    podman("stop", "--time", "20", gateway, timeout=60)
    request.join(30)
    answered = "response" in outcome and outcome["at"] > stop_at
    if not report.check(
        "podman stop: the request in flight is answered",
        answered,
        f"{outcome['at'] - stop_at:.1f} s after SIGTERM" if answered else repr(outcome),
    ):
        return
    check_answer(report, "podman stop: that request", outcome["response"])
    code = podman("inspect", gateway, "--format", "{{.State.ExitCode}}").stdout.strip()
    report.check("podman stop: gunicorn exits 0", code == "0", f"exit code {code}")
    output = logs(gateway)
    report.check(
        "podman stop: gunicorn shuts down on SIGTERM",
        "Handling signal: term" in output and "Shutting down: Master" in output,
        output[-1500:] if "Shutting down: Master" not in output else "",
    )


# --- 4: compose -------------------------------------------------------------------------------


def compose_file(directory: Path) -> Path:
    """compose.yaml's gateway and mocks, their ports published on free loopback ports."""
    spec = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    services = {name: spec["services"][name] for name in ("gateway", *DEFAULT_NAMES)}
    # No redis service here: feedback off (an empty store), and nothing to wait for.
    services["gateway"]["environment"]["GATEWAY_FEEDBACK__STORE"] = ""
    services["gateway"]["depends_on"].pop("redis", None)
    for service in services.values():
        # Built above; podman-compose would otherwise build it once per service.
        del service["build"]
        service["ports"] = [f"127.0.0.1::{port.rsplit(':', 1)[1]}" for port in service["ports"]]
    path = directory / "compose.yaml"
    path.write_text(yaml.safe_dump({"services": services}), encoding="utf-8")
    return path


def compose_container(project: str, service: str) -> str:
    """The name of the container podman-compose made for `service`."""
    return podman(
        *("ps", "--all", "--format", "{{.Names}}"),
        *("--filter", f"label=io.podman.compose.project={project}"),
        *("--filter", f"label=com.docker.compose.service={service}"),
    ).stdout.split()[0]


def run_compose(report: Report, project: str, file: Path) -> None:
    """Up, checked; taken down by the caller."""
    spec = yaml.safe_load(file.read_text(encoding="utf-8"))["services"]
    report.check(
        "compose.yaml runs the image scripts/image.sh builds",
        all(service["image"] == IMAGE for service in spec.values()),
    )
    up = subprocess.run(
        ["podman-compose", "--project-name", project, "--file", str(file), "up", "--detach"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode != 0:
        raise Failed(f"podman-compose up: {(up.stdout + up.stderr)[-3000:]}")
    gateway = compose_container(project, "gateway")
    gateway_url = published(gateway, GATEWAY_PORT)
    wait_ready(gateway_url, gateway)
    # podman-compose 1.0.3 does not wait for depends_on's service_healthy.
    wait_until(
        lambda: all(
            logs(compose_container(project, name)).count("listening") for name in DEFAULT_NAMES
        ),
        READY_WITHIN_S,
        "mocks listening",
    )
    report.check("compose: the gateway is ready", True, gateway_url)
    check_answer(report, "compose: POST /recommendation (mocks by name)", recommend(gateway_url))
    check_metrics(report, "compose", gateway_url)
    mounts = podman("exec", gateway, "cat", "/proc/mounts").stdout
    report.check(
        f"compose: {METRICS_DIR} is a tmpfs",
        any(line.split()[1:3] == [METRICS_DIR, "tmpfs"] for line in mounts.splitlines()),
    )
    # Run as compose.yaml gives them: podman-compose 1.0.3 mangles a CMD list into a shell line.
    for name in DEFAULT_NAMES:
        test = spec[name]["healthcheck"]["test"]
        health = podman("exec", compose_container(project, name), *test[1:], check=False)
        report.check(
            f"compose: {name}'s health check passes",
            test[0] == "CMD" and health.returncode == 0,
            health.stderr.strip()[-300:],
        )


def take_down(project: str, file: Path) -> None:
    """Remove what podman-compose made, its network too (1.0.3's `down` leaves it)."""
    subprocess.run(
        ["podman-compose", "--project-name", project, "--file", str(file), "down"],
        capture_output=True,
        timeout=120,
    )
    left = podman(
        *("ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={project}"),
        check=False,
    ).stdout.split()
    if left:
        podman("rm", "--force", *left, check=False)
    podman("network", "rm", "--force", f"{project}_default", check=False)


# --- the whole ----------------------------------------------------------------------------------


def build(report: Report) -> bool:
    """`scripts/image.sh build`; its output is shown only when it fails."""
    print("building the image (scripts/image.sh build; the first time, a base too: minutes)")
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "image.sh"), "build"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "IMAGE": IMAGE},  # the name compose.yaml uses too
    )
    took = f"{time.monotonic() - started:.0f} s"
    if not report.check("the image builds", result.returncode == 0, took):
        print(result.stdout[-5000:])
        return False
    size = podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip()
    print(f"     {IMAGE}: {int(size) / 1e6:.0f} MB")
    return True


def check_locked(report: Report) -> None:
    """The image's Python holds what uv.lock pins for it, and nothing else."""
    exported = subprocess.run(
        [str(UV), "export", "--frozen", "--no-hashes", "--no-header", "--no-annotate"]
        + ["--no-emit-project", *(f"--extra={extra}" for extra in IMAGE_EXTRAS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    image = json.loads(
        podman("run", "--rm", "--no-healthcheck", IMAGE, "python", "-c", _INSTALLED).stdout
    )
    pinned: dict[NormalizedName, str] = {}
    for line in exported.splitlines():
        requirement, _, marker = line.partition(";")
        name, _, version = requirement.strip().partition("==")
        if version and (not marker.strip() or Marker(marker).evaluate(image["environment"])):
            pinned[canonicalize_name(name)] = version
    installed = {
        canonicalize_name(name): version
        for name, version in image["installed"].items()
        if canonicalize_name(name) != "fusion-gateway"
    }
    differ = sorted(
        f"{name}: image {installed.get(name, '-')}, lock {pinned.get(name, '-')}"
        for name in pinned.keys() | installed.keys()
        if installed.get(name) != pinned.get(name)
    )
    report.check(
        "the image holds exactly what uv.lock pins",
        not differ,
        "; ".join(differ) or f"{len(pinned)} packages",
    )


def step(report: Report, what: str, run: Callable[[], None]) -> None:
    """Run one step; a `Failed` is its FAIL line, and the next step still runs."""
    started = time.monotonic()
    try:
        run()
    except (Failed, requests.RequestException, subprocess.TimeoutExpired) as exc:
        report.check(what, False, str(exc))
    print(f"     {what}: {time.monotonic() - started:.0f} s", flush=True)


def main() -> int:
    """Build and check; 0 if every check passed."""
    # podman's settings for this machine, as scripts/image.sh uses them.
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    started = time.monotonic()
    report = Report()
    if shutil.which("podman") is None:
        report.check("podman is installed", False, "apt-get install podman")
        return 1
    if not build(report):
        return 1
    step(report, "lock", lambda: check_locked(report))
    name = f"fusion-gateway-test-{os.getpid()}"
    try:
        step(report, "pod", lambda: run_pod(report, name))
    finally:
        podman("pod", "rm", "--force", name, check=False)
    if report.check("podman-compose is installed", shutil.which("podman-compose") is not None):
        with tempfile.TemporaryDirectory() as directory:
            file = compose_file(Path(directory))
            try:
                step(report, "compose", lambda: run_compose(report, name, file))
            finally:
                take_down(name, file)
    verdict = "FAIL" if report.failures else "PASS"
    print(f"{verdict}: {report.failures} failed, in {time.monotonic() - started:.0f} s")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
