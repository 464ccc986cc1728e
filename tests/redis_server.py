"""A real redis-server for tests, on a loopback port, with no persistence, stopped at the end.

`RedisServer.served_with(arguments, directory)` runs one with a deployment's own arguments
instead (compose, Kubernetes), moved to a loopback port and a scratch directory.

Redis refuses port 0, so the port cannot be read back from the server as the other servers'
are: a free one is found by binding a socket, released, and handed to redis-server; if another
process takes it in between, redis-server exits at once, and a new port is tried.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import redis

from mock_recommenders.loopback import loopback_socket, port_of
from mock_recommenders.process import stop_process
from tests.tools import require_tool

__all__ = ["DroppingProxy", "RedisServer"]

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

    def restart(self) -> None:
        """Stop the server and start a new one on the same port, empty (no persistence)."""
        assert self._process is not None, "the server is not running"
        stop_process(self._process)
        program = require_tool("redis-server")
        command = [program, "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        command += ["--logfile", str(self.directory / "redis.log"), "--daemonize", "no"]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        if not self._wait_for_ping():
            raise RuntimeError(f"redis-server did not restart on port {self.port}")

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._process is not None, "the server is not running"
        return self._process.pid

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


class DroppingProxy:
    """`with DroppingProxy(port, b"EVALSHA", lose="request") as proxy:` a TCP proxy on a
    loopback port to the server at `port` that drops the first connection carrying `marker`.

    `lose="request"` closes that connection instead of passing the request on (the command
    never ran); `lose="reply"` passes it on and closes the connection instead of passing the
    answer back (the command ran, its caller never heard). Every other byte is passed on as
    it comes. `proxy.dropped` tells whether it has dropped one yet.
    """

    def __init__(self, port: int, marker: bytes, lose: str):
        if lose not in ("request", "reply"):
            raise ValueError(f"lose is 'request' or 'reply', not {lose!r}")
        self.upstream, self.marker, self.lose = port, marker, lose
        self.dropped = False
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = port_of(self._listener)
        self._sockets: list[socket.socket] = []

    def url(self, database: int = 0) -> str:
        """The URL of database `database` through this proxy."""
        return f"redis://127.0.0.1:{self.port}/{database}"

    def __enter__(self) -> DroppingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._sockets += [client, server]
            pair: dict[str, bool] = {"armed": False}
            for ends in ((client, server, pair, True), (server, client, pair, False)):
                threading.Thread(target=self._pump, args=ends, daemon=True).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, pair: dict[str, bool], upward: bool
    ) -> None:
        try:
            while data := source.recv(65536):
                if upward and self.marker in data:
                    with self._lock:
                        first, self.dropped = not self.dropped, True
                    if first and self.lose == "request":
                        break
                    pair["armed"] = pair["armed"] or first
                elif not upward and pair["armed"]:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
