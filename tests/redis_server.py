"""A real redis-server for tests, on a loopback port, with no persistence, stopped at the end.

`RedisServer.served_with(arguments, directory)` runs one with a deployment's own arguments
instead (compose, Kubernetes), moved to a loopback port and a scratch directory.

Redis refuses port 0, so the port cannot be read back from the server as the other servers'
are: a free one is found by binding a socket, released, and handed to redis-server; if another
process takes it in between, redis-server exits at once, and a new port is tried.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import redis

from mock_recommenders.loopback import loopback_socket, port_of
from mock_recommenders.process import stop_process
from tests.tools import require_tool

__all__ = ["RedisServer"]

_ATTEMPTS = 5
_START_TIMEOUT_S = 10.0


class RedisServer:
    """`with RedisServer(directory) as server:` a redis-server at `server.url(db)`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database: int = 0) -> str:
        """The URL of database `database` on this server."""
        return f"redis://127.0.0.1:{self.port}/{database}"

    def __enter__(self) -> RedisServer:
        program = require_tool("redis-server")
        log = self.directory / "redis.log"
        for _attempt in range(_ATTEMPTS):
            with loopback_socket() as sock:
                self.port = port_of(sock)
            command = [program, "--bind", "127.0.0.1", "--port", str(self.port)]
            command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
            command += ["--logfile", str(log), "--daemonize", "no"]
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
            if self._wait_for_ping():
                return self
            stop_process(self._process)
        raise RuntimeError(
            f"redis-server did not start in {_ATTEMPTS} attempts; its log: {log.read_text()}"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    @classmethod
    @contextlib.contextmanager
    def served_with(cls, arguments: Sequence[str], directory: Path) -> Iterator[RedisServer]:
        """A redis-server run with `arguments`, but on a free loopback port and in `directory`.

        Their `--port`, `--bind` and `--dir` are replaced (or added). Fails, with what the
        server said, if it refuses the arguments.
        """
        server = cls(directory)
        program = require_tool("redis-server")
        log, output = directory / "redis.log", directory / "redis.out"
        for _attempt in range(_ATTEMPTS):
            with loopback_socket() as sock:
                server.port = port_of(sock)
            here = {"--port": str(server.port), "--bind": "127.0.0.1", "--dir": str(directory)}
            command = list(arguments)
            for flag, value in here.items():
                if flag in command:
                    command[command.index(flag) + 1] = value
                else:
                    command += [flag, value]
            command += ["--logfile", str(log), "--daemonize", "no"]
            # A refused argument is reported on stderr, before the log file is opened.
            with output.open("wb") as sink:
                server._process = subprocess.Popen(
                    [program, *command], stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
                )
            if server._wait_for_ping():
                try:
                    yield server
                finally:
                    server.__exit__(None, None, None)
                return
            stop_process(server._process)
            said = output.read_text() + (log.read_text() if log.exists() else "")
            if "Address already in use" not in said:
                break
        raise AssertionError(f"redis-server {' '.join(arguments)} did not start:\n{said}")

    def _wait_for_ping(self) -> bool:
        """Whether our process answers; False as soon as it exits (the port was taken).

        The answer must carry our process id: another server that took the port in between
        would answer too.
        """
        assert self._process is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        give_up = time.monotonic() + _START_TIMEOUT_S
        try:
            while time.monotonic() < give_up:
                if self._process.poll() is not None:
                    return False
                try:
                    info = client.info("server")
                    return bool(info["process_id"] == self._process.pid)
                except redis.ConnectionError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()
