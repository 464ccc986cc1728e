"""nginx as the load balancer in front of gateway instances, started and stopped here.

Debian's nginx (``nginx-light``) runs from a prefix of its own, with its own config, logs and
temporary folders: nothing of the system's nginx is read or written. The port it listens on is
bound here and handed over, as gunicorn's ``--bind fd://N`` is: nginx adopts the listening
sockets named in its ``NGINX`` environment variable (what its binary upgrade uses), so no
other process can take the port between its choice and its use.

Every answer carries ``X-Upstream``: nginx's ``$upstream_addr``, the instances it tried for
that request, in order ("127.0.0.1:A, 127.0.0.1:B" when it tried a second).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mock_recommenders.loopback import loopback_socket, port_of

__all__ = [
    "DEFAULT_RETRY",
    "UPSTREAM_HEADER",
    "Balancer",
    "find_nginx",
    "group_members",
    "leftover_processes",
    "nginx_complaints",
    "nginx_config",
    "serve_nginx",
    "wait_ready",
]

UPSTREAM_HEADER = "X-Upstream"
# nginx's default: a POST is retried on the next instance only if it was never sent.
DEFAULT_RETRY = "error timeout"
READY_WITHIN_S = 30.0

_NGINX_COMPLAINT = re.compile(r"\[(?:error|warn)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: .*)?$")


def find_nginx() -> str | None:
    """The nginx binary on PATH, or in /usr/sbin or /sbin (where Debian puts it)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("nginx", path=search)


def nginx_config(prefix: Path, logs: Path, port: int, upstreams: list[int], retry: str) -> str:
    """nginx.conf: listen on loopback `port`, balance over `upstreams`, retry on `retry`."""
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in upstreams
    )
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {logs / "error.log"} notice;

events {{
    worker_connections 1024;
}}

http {{
    log_format upstreams '$msec $status $request_time "$upstream_addr" "$upstream_status"';
    access_log {logs / "access.log"} upstreams;
{temp}

    upstream gateways {{
{servers}
        keepalive 32;
        # Below the gateway's own idle keep-alive (gunicorn's `keepalive`, 15 s): nginx closes an
        # idle connection first, and never sends a request on one the gateway is closing.
        keepalive_timeout 10s;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream {retry};
            proxy_next_upstream_tries 2;
            proxy_connect_timeout 2s;
            proxy_read_timeout 30s;
            add_header {UPSTREAM_HEADER} $upstream_addr always;
        }}
    }}
}}
"""


def group_members(group: int) -> list[int]:
    """The live processes (zombies left out) in process group `group` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _, group_of = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(group_of) == group and state != "Z":
                members.append(int(entry.name))
    return members


def leftover_processes(group: int, within_s: float = 5.0) -> list[int]:
    """The processes of group `group` still alive `within_s` after its leader was reaped.

    A process killed with its group dies a moment after the signal, not at once: it is given
    that moment.
    """
    give_up = time.monotonic() + within_s
    while (members := group_members(group)) and time.monotonic() < give_up:
        time.sleep(0.05)
    return members


@dataclass
class Balancer:
    """A running nginx: its URL, its master process, its folder of logs."""

    url: str
    process: subprocess.Popen[bytes]
    logs: Path
    exit_code: int | None = None
    leftover: list[int] = field(default_factory=list)

    def stop(self) -> int:
        """SIGQUIT (finish what is in flight, then exit), SIGKILL after 30 s; the exit code.

        Records in `leftover` any process of nginx's group still alive after its master.
        Stopping it again only returns the exit code.
        """
        if self.exit_code is not None:
            return self.exit_code
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
        try:
            self.exit_code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.exit_code = self.process.wait()
        self.leftover = leftover_processes(self.process.pid)
        return self.exit_code


@contextlib.contextmanager
def serve_nginx(
    nginx: str, upstreams: list[int], logs: Path, retry: str = DEFAULT_RETRY
) -> Iterator[Balancer]:
    """nginx balancing over the loopback ports `upstreams`; yields it, stops it at the end.

    Its config and logs are written to `logs`; it runs in a session of its own, so that its
    processes can be told apart (and none be left over) by their process group.
    """
    logs = logs.resolve()  # nginx reads a relative path as relative to its prefix
    logs.mkdir(parents=True, exist_ok=True)
    for log in ("error.log", "access.log"):  # nginx appends: only this run's lines
        (logs / log).unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        prefix = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nginx-")))
        # As root, nginx's workers run as `nobody`, and must reach the temporary folders.
        prefix.chmod(0o755)
        listener = stack.enter_context(loopback_socket())
        listener.listen(511)
        port = port_of(listener)
        config = logs / "nginx.conf"
        config.write_text(nginx_config(prefix, logs, port, upstreams, retry))
        # What nginx says before it has opened its error log (a bad config) goes to its output.
        with (logs / "nginx.out").open("wb") as output:
            process = subprocess.Popen(
                [nginx, "-p", str(prefix), "-c", str(config), "-e", str(logs / "error.log")],
                env={**os.environ, "NGINX": f"{listener.fileno()};"},
                pass_fds=(listener.fileno(),),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        listener.close()
        balancer = Balancer(f"http://127.0.0.1:{port}", process, logs)
        try:
            # The socket listens before nginx runs: a connection waits in its backlog until
            # nginx accepts it, so readiness is an answer, not a connection.
            wait_ready(f"{balancer.url}/readyz", process, logs / "nginx.out", logs / "error.log")
            yield balancer
        finally:
            balancer.stop()


def wait_ready(url: str, process: subprocess.Popen[bytes], *logs: Path) -> None:
    """Return once GET `url` answers 200; RuntimeError, with the end of `logs`, if `process`
    exits first or it does not within 30 s."""
    give_up = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < give_up:
        if process.poll() is not None:
            said = "".join(log.read_text(errors="replace") for log in logs if log.exists())
            raise RuntimeError(f"{url} exited at start-up:\n{said[-2000:]}")
        # HTTPException: a connection closed unanswered while a server still starts.
        with (
            contextlib.suppress(OSError, http.client.HTTPException),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {READY_WITHIN_S:.0f} s")


def nginx_complaints(error_log: Path) -> dict[str, int]:
    """nginx's errors and warnings in `error_log`, counted by message (what went wrong with
    the upstreams, and when it gave up on one)."""
    found: Counter[str] = Counter()
    for line in error_log.read_text(errors="replace").splitlines():
        if match := _NGINX_COMPLAINT.search(line):
            found[match.group(1)] += 1
    return dict(found.most_common())
