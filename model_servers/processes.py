"""The model servers as child processes, started from the gateway's side (its venv, pytest).

`KServeProcess` and `MLServerProcess` start ``model_servers.als`` under kserve or MLServer,
each with the python of its own venv (`make model-servers` builds them), and stop them. Nothing
here imports kserve or mlserver: kserve parses ``sys.argv`` when imported, and the two pin
versions that conflict with each other and with nothing of the gateway only because they never
share a process with it.

Each server is asked for port 0 and reports the port it bound in its log (uvicorn's "Uvicorn
running on http://127.0.0.1:PORT" line), which is read back here: no moment between choosing a
port and binding it, as for the mocks (`mock_recommenders.process`). A server runs in a session
of its own, and stopping it signals the whole process group: MLServer's own child outlives it by
a second otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "READY_WITHIN_S",
    "ROOT",
    "KServeProcess",
    "MLServerProcess",
    "ModelServerMissing",
    "ModelServerProcess",
    "missing_model_servers",
]

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
MODEL = ROOT / ".cache" / "models" / "als-2026.npz"
READY_WITHIN_S = 60.0
STOP_WITHIN_S = 5.0
_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class ModelServerMissing(RuntimeError):
    """A model server's venv or the model it serves is not built (`make model-servers`)."""


def missing_model_servers(model: Path = MODEL) -> str | None:
    """What of `make model-servers` is missing (a sentence), or None when all of it is there."""
    missing = [
        str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        for path in (
            VENVS / "kserve" / "bin" / "python",
            VENVS / "mlserver" / "bin" / "python",
            model,
        )
        if not path.exists()
    ]
    if not missing:
        return None
    return f"{', '.join(missing)} missing: run `make model-servers`"


class ModelServerProcess:
    """A model server in a child process on a loopback port; use it as a context manager.

    Subclasses say which venv and which command; this starts it, waits until model ``als`` is
    ready (``GET /v2/models/als/ready`` answers 200), and stops its whole process group.
    """

    venv = ""
    """The directory under `.venvs/` whose python runs the server."""

    def __init__(self, port: int = 0, model: Path = MODEL, log: Path | None = None) -> None:
        self.requested_port = port
        self.model = model
        self._own_log = log is None
        self.log = (
            log
            if log is not None
            else Path(tempfile.mkstemp(prefix=f"{self.venv}-", suffix=".log")[1])
        )
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ModelServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return VENVS / self.venv / "bin" / "python"

    @property
    def pid(self) -> int:
        """The server's process id, which is also its process group's."""
        return self._running().pid

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def v1_url(self, model: str) -> str:
        """The V1 (KServe) prediction endpoint of `model`."""
        return f"{self.base_url}/v1/models/{model}:predict"

    def v2_url(self, model: str) -> str:
        """The V2 (Open Inference Protocol) inference endpoint of `model`."""
        return f"{self.base_url}/v2/models/{model}/infer"

    def command(self) -> list[str]:
        """The command line that starts the server (with the repository as working directory)."""
        raise NotImplementedError

    def start(self) -> ModelServerProcess:
        """Start the server and return once model ``als`` answers ready."""
        if self._process is not None:
            raise RuntimeError(f"this {type(self).__name__} is already running")
        missing = missing_model_servers(self.model)
        if missing is not None:
            raise ModelServerMissing(missing)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env |= {"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as sink:
            self._process = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(self._process)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after a few seconds; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            _stop_group(process)
        if self._own_log:
            self.log.unlink(missing_ok=True)

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs."""
        return self._running().poll()

    def output(self) -> str:
        """What the server has logged so far."""
        return self.log.read_bytes().decode(errors="replace")

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"this {type(self).__name__} is not running")
        return self._process

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        give_up = time.monotonic() + READY_WITHIN_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{self.venv} exited with code {process.returncode} at start-up:\n"
                    + self.output()[-3000:]
                )
            if time.monotonic() > give_up:
                raise RuntimeError(
                    f"{self.venv} was not ready within {READY_WITHIN_S:.0f} s:\n"
                    + self.output()[-3000:]
                )
            if not self.port:
                found = _RUNNING.search(self.output())
                self.port = int(found.group(1)) if found else 0
            if self.port and _status(f"{self.base_url}/v2/models/als/ready") == 200:
                return
            time.sleep(0.1)


class KServeProcess(ModelServerProcess):
    """The ALS model under KServe 0.21: V1 and V2 over REST, no gRPC, one worker."""

    venv = "kserve"

    def command(self) -> list[str]:
        """``python -m model_servers.als.kserve_server`` with kserve's own flags."""
        program = [str(self.python), "-m", "model_servers.als.kserve_server"]
        return program + ["--model", str(self.model), "--http_port", str(self.requested_port)] + [
            "--enable_grpc", "false", "--workers", "1",
        ]  # fmt: skip


class MLServerProcess(ModelServerProcess):
    """The ALS model under MLServer 1.7: V2 over REST (gRPC on a free port, no metrics)."""

    venv = "mlserver"

    def command(self) -> list[str]:
        """``python -m model_servers.als.mlserver_runtime``, which writes settings and serves."""
        program = [str(self.python), "-m", "model_servers.als.mlserver_runtime"]
        return program + ["--model", str(self.model), "--http-port", str(self.requested_port)]


def _status(url: str) -> int:
    """The HTTP status `url` answers a GET with, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _stop_group(process: subprocess.Popen[Any]) -> None:
    """SIGTERM to the process group (the server and any child of it), SIGKILL after a few s."""
    group = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait()
    # The leader is gone; a child of it may still be winding down in the group.
    give_up = time.monotonic() + STOP_WITHIN_S
    while _group_alive(group):
        if time.monotonic() > give_up:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            break
        time.sleep(0.05)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
