"""`MockFleetProcess`: the mock recommenders in a child process, on ports the system picks.

`MockFleet` shares the caller's process and its GIL; under load (a benchmark, a soak test, a
hundred concurrent requests through a gateway) the mocks then compete with the caller for one
core, and their answers are late for reasons that have nothing to do with what is measured.
This runs ``python -m mock_recommenders --base-port 0`` instead, reads back the ports it bound
from the lines it prints, and drives it over its HTTP admin endpoints: the same `url`,
`set_behaviour`, `stats` and `reset` as `MockFleet`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mock_recommenders.server import DEFAULT_NAMES

__all__ = ["MockFleetProcess", "stop_process"]

READY_WITHIN_S = 30.0
_LISTENING = re.compile(r"^mock recommender (\S+) listening on (http://\S+)/test$", re.MULTILINE)


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> int:
    """SIGTERM, as a process manager stops a service, then SIGKILL after `timeout_s`.

    Returns the exit code.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class MockFleetProcess:
    """Serves mock recommenders from a child process; start it, use it, stop it.

    `flags` are more ``python -m mock_recommenders`` flags (``--delay-ms 20``, ...). The child's
    output goes to `log` (a temporary file, removed at stop, when none is given). With a
    `base_port`, they listen on consecutive ports from it instead of on free ones.
    """

    def __init__(
        self,
        names: Sequence[str] = DEFAULT_NAMES,
        flags: Sequence[str] = (),
        log: Path | None = None,
        host: str = "127.0.0.1",
        base_port: int = 0,
        python: str = sys.executable,
    ) -> None:
        self.names = list(names)
        self.host = host
        self.base_port = base_port
        self._flags = list(flags)
        self._python = python
        self._own_log = log is None
        self.log = (
            log if log is not None else Path(tempfile.mkstemp(prefix="mocks-", suffix=".log")[1])
        )
        self._bases: dict[str, str] = {}
        self._initial: dict[str, dict[str, Any]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    def __enter__(self) -> MockFleetProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._running().pid

    def start(self) -> MockFleetProcess:
        """Start the child and return once every recommender listens."""
        if self._process is not None:
            raise RuntimeError("this MockFleetProcess is already running")
        command = [self._python, "-m", "mock_recommenders", "--host", self.host]
        command += ["--names", ",".join(self.names), "--base-port", str(self.base_port)]
        command += self._flags
        with self.log.open("ab") as sink:
            # A log given twice holds an earlier run's lines: only what follows is this run's.
            self._log_from = sink.tell()
            self._process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            self._bases = self._wait_listening(self._process)
            self._initial = {
                name: self._admin(name, "GET", "/admin/behaviour") for name in self.names
            }
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, as a process manager stops it (a kill after 10 s); idempotent."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)
        if self._own_log:
            self.log.unlink(missing_ok=True)

    def poll(self) -> int | None:
        """The child's exit code once it has exited, else None."""
        return self._running().poll()

    def url(self, name: str) -> str:
        """The recommender's endpoint URL."""
        return f"{self._bases[name]}/test"

    def port(self, name: str) -> int:
        """The port the recommender listens on."""
        return int(self._bases[name].rsplit(":", 1)[1])

    def set_behaviour(self, name: str | None = None, **changes: Any) -> None:
        """Change the behaviour of `name`, or of every recommender when `name` is None."""
        for each in self._select(name):
            self._admin(each, "PUT", "/admin/behaviour", changes)

    def stats(self, name: str) -> dict[str, Any]:
        """The counters of `name`, as ``GET /stats`` gives them."""
        return self._admin(name, "GET", "/stats")

    def reset(self) -> None:
        """Zero every counter and restore every behaviour to the one it started with."""
        for name in self.names:
            self._admin(name, "PUT", "/admin/behaviour", self._initial[name])
            self._admin(name, "POST", "/stats/reset")

    def output(self) -> str:
        """What the child has printed so far."""
        with self.log.open("rb") as log:
            log.seek(self._log_from)
            return log.read().decode(errors="replace")

    def _select(self, name: str | None) -> list[str]:
        if name is not None and name not in self._bases:
            raise KeyError(name)
        return self.names if name is None else [name]

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("this MockFleetProcess is not running")
        return self._process

    def _wait_listening(self, process: subprocess.Popen[bytes]) -> dict[str, str]:
        give_up = time.monotonic() + READY_WITHIN_S
        while True:
            found = dict(_LISTENING.findall(self.output()))
            if set(self.names) <= set(found):
                return {name: found[name] for name in self.names}
            if process.poll() is not None:
                raise RuntimeError(
                    f"the mock recommenders exited with code {process.returncode} at start-up:\n"
                    + self.output()[-2000:]
                )
            if time.monotonic() > give_up:
                raise RuntimeError(
                    f"the mock recommenders did not listen within {READY_WITHIN_S:.0f} s:\n"
                    + self.output()[-2000:]
                )
            time.sleep(0.02)

    def _admin(self, name: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        self._running()
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self._bases[name] + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            # The admin endpoint refuses a bad change with 422 and a message naming the field.
            message = json.loads(exc.read() or b"{}").get("error", str(exc))
            raise ValueError(f"{name}: {message}") from None
        return answer
