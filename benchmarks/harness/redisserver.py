"""A redis-server for a benchmark: on a loopback port, no persistence, stopped at the end.

Redis refuses port 0, so a free port is found by binding a socket, released, and handed to
redis-server; if another process takes it in between, redis-server exits at once and another
port is tried (as `tests/redis_server.py` does for the tests, without pytest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from mock_recommenders.loopback import loopback_socket, port_of
from mock_recommenders.process import stop_process

__all__ = ["find_redis_server", "serve_redis"]

_ATTEMPTS = 5
_START_TIMEOUT_S = 10.0


def find_redis_server() -> str | None:
    """The redis-server binary on PATH, /usr/sbin or /sbin, or None."""
    directories = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return shutil.which("redis-server", path=os.pathsep.join([*directories, "/usr/sbin", "/sbin"]))


@contextlib.contextmanager
def serve_redis(directory: Path, program: str | None = None) -> Iterator[str]:
    """Run redis-server with its log in `directory`; yields the URL of its database 0."""
    program = program or find_redis_server()
    if program is None:
        raise RuntimeError("redis-server is not installed (make tools: apt-get install redis)")
    log = directory / "redis.log"
    for _attempt in range(_ATTEMPTS):
        with loopback_socket() as sock:
            port = port_of(sock)
        command = [program, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        command += ["--appendonly", "no", "--dir", str(directory), "--logfile", str(log)]
        process = subprocess.Popen([*command, "--daemonize", "no"], stdin=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
        try:
            if _answers(client, process):
                yield f"redis://127.0.0.1:{port}/0"
                return
        finally:
            client.close()
            stop_process(process)
    said = log.read_text()[-2000:] if log.exists() else ""
    raise RuntimeError(f"redis-server did not start in {_ATTEMPTS} attempts; its log:\n{said}")


def _answers(client: redis.Redis, process: subprocess.Popen[bytes]) -> bool:
    """Whether our process answers; False as soon as it exits (the port was taken).

    The answer must carry our process id: another server that took the port would answer too.
    """
    give_up = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < give_up:
        if process.poll() is not None:
            return False
        try:
            return bool(client.info("server")["process_id"] == process.pid)
        except redis.ConnectionError:
            time.sleep(0.02)
    return False
