"""`make run`: the four mock recommenders and the gateway under gunicorn, stopped together.

Starts `python -m mock_recommenders` (ports 5001-5004) and gunicorn (port 5000), waits until
every one of them answers, prints a `curl` line to try, and on Ctrl-C (or when either process
dies) stops both. ``--port 0`` and ``--mock-base-port 0`` take ports the system picks instead.

Feedback is on, in the embedded store: unless `GATEWAY_FEEDBACK__STORE` is set (empty: off),
the gateway keeps impressions and clicks in `.feedback/feedback.db` under the repository
(gitignored), with a salt made once and kept beside it (`.feedback/salt`), so that users keep
their pseudonyms and experiment arms from one run to the next.

The gateway's port is bound here and handed to gunicorn (``--bind fd://N``): a port in use is
reported at once, and port 0 is known before gunicorn starts.

``--with-models`` (``make run-models``) also serves the real ALS model of `model_servers/`
beside the mocks: KServe's ModelServer over KServe V1 (`als-v1`) and MLServer over the Open
Inference Protocol (`als-v2`), on free loopback ports, and the gateway fans out to all six.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from mock_recommenders import DEFAULT_NAMES, MockFleetProcess
from mock_recommenders.process import stop_process
from model_servers.processes import KServeProcess, MLServerProcess, ModelServerProcess

ROOT = Path(__file__).resolve().parent.parent
READY_WITHIN_S = 60.0
# The embedded feedback store of `make run`, and its salt (both gitignored).
FEEDBACK_DIR = ROOT / ".feedback"


def feedback_environment(environ: dict[str, str], directory: Path = FEEDBACK_DIR) -> dict[str, str]:
    """The variables that switch feedback on in `directory`'s SQLite file, unless set already.

    The salt is made once (random, 256 bits) and kept in `directory/salt`, readable by its
    owner only; a salt set in the environment wins.
    """
    if "GATEWAY_FEEDBACK__STORE" in environ:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    added = {"GATEWAY_FEEDBACK__STORE": f"sqlite:///{directory / 'feedback.db'}"}
    if "GATEWAY_FEEDBACK__SALT" not in environ:
        salt_file = directory / "salt"
        if not salt_file.exists():
            salt_file.touch(mode=0o600)
            salt_file.write_text(secrets.token_hex(32))
        added["GATEWAY_FEEDBACK__SALT"] = salt_file.read_text().strip()
    return added


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        # HTTPException: a server still starting can close a connection before answering
        # (http.client.BadStatusLine, RemoteDisconnected).
        return False


def _wait_ready(gateway: subprocess.Popen[bytes], url: str, stop: threading.Event) -> None:
    give_up = time.monotonic() + READY_WITHIN_S
    while not stop.is_set() and not _answers(url):
        if gateway.poll() is not None:
            raise SystemExit(f"run: the gateway exited with code {gateway.returncode} at start-up")
        if time.monotonic() > give_up:
            raise SystemExit(f"run: no answer within {READY_WITHIN_S:.0f} s from {url}")
        stop.wait(0.2)


def _bind(port: int) -> socket.socket:
    listener = socket.socket()
    # As gunicorn binds: a restart must not wait for the last run's connections to time out.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as exc:
        listener.close()
        raise SystemExit(f"run: cannot use port {port} for the gateway: {exc.strerror}") from None
    return listener


def main(argv: list[str] | None = None) -> int:
    """Run until Ctrl-C or until one of the processes dies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000, help="the gateway's port (0: any)")
    parser.add_argument(
        "--mock-base-port",
        type=int,
        default=5001,
        help="the first of the four mocks' consecutive ports (0: any free ones)",
    )
    parser.add_argument(
        "--feedback-dir",
        type=Path,
        default=FEEDBACK_DIR,
        help="where the embedded feedback store and its salt are kept (default: .feedback)",
    )
    parser.add_argument(
        "--with-models",
        action="store_true",
        help="also serve the ALS model on KServe (V1) and MLServer (V2) beside the mocks "
        "(needs `make model-servers`)",
    )
    args = parser.parse_args(argv)
    # Set explicitly: a process started in the background inherits SIGINT ignored, and the
    # children may see Ctrl-C before this process does, so their exit is not an error then.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    listener = _bind(args.port)
    gateway_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    mocks = MockFleetProcess(DEFAULT_NAMES, base_port=args.mock_base_port)
    models: list[ModelServerProcess] = []
    gateway: subprocess.Popen[bytes] | None = None
    try:
        try:
            mocks.start()
            if args.with_models:
                models = [KServeProcess(), MLServerProcess()]
                for server in models:
                    server.start()
        except RuntimeError as exc:
            if stop.is_set():  # Ctrl-C during start-up reached the mocks too
                return 0
            raise SystemExit(f"run: {exc}") from None
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update(feedback_environment(env, args.feedback_dir))
        recommenders = [
            {"name": name, "url": mocks.url(name), "timeout_ms": 500} for name in DEFAULT_NAMES
        ]
        if models:
            kserve, mlserver = models
            recommenders += [
                {"name": "als-v1", "url": kserve.v1_url("als"), "protocol": "kserve-v1"},
                {"name": "als-v2", "url": mlserver.v2_url("als"), "protocol": "open-inference"},
            ]
        if args.mock_base_port != 5001 or models:
            # The packaged config points at the mocks on 5001-5004; anything else needs a list.
            env["GATEWAY_RECOMMENDERS"] = json.dumps(recommenders)
        gateway = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "gunicorn"),
                *("-c", "gunicorn.conf.py", "gateway.asgi:app"),
                *("--bind", f"fd://{listener.fileno()}"),
            ],
            cwd=ROOT,
            env=env,
            pass_fds=(listener.fileno(),),
        )
        listener.close()  # gunicorn holds it now
        _wait_ready(gateway, f"{gateway_url}/readyz", stop)
        if stop.is_set():
            return 0
        curl = (
            f"curl -s -X POST {gateway_url}/recommendation -H 'Content-Type: application/json' "
            """-d '{"user_id": "u1", "resultSize": 3}'"""
        )
        if env.get("GATEWAY_FEEDBACK__STORE"):
            curl += (
                f"\n  curl -s -X POST {gateway_url}/feedback -H 'Content-Type: application/json' "
                """-d '{"request_id": "<request_id>", "item_id": "<a fused id>", """
                """"event": "click"}'"""
                f"\n  curl -s {gateway_url}/experiments"
            )
        served = ", ".join(f"{name} {mocks.url(name)}" for name in DEFAULT_NAMES)
        if models:
            served += f"; the ALS model: als-v1 {kserve.v1_url('als')} (KServe V1), "
            served += f"als-v2 {mlserver.v2_url('als')} (MLServer, Open Inference)"
        print(
            f"\nReady: the gateway on {gateway_url}, mock recommenders {served}.\n"
            f"Try it:\n\n  {curl}\n\nCtrl-C stops everything.\n",
            flush=True,
        )
        while (
            not stop.is_set()
            and gateway.poll() is None
            and mocks.poll() is None
            and all(server.poll() is None for server in models)
        ):
            stop.wait(0.5)
        if stop.wait(1.0):
            return 0
        if mocks.poll() is not None:
            print(f"run: the mock recommenders stopped:\n{mocks.output()[-2000:]}", file=sys.stderr)
        print("run: the gateway or the mocks stopped; stopping the rest", file=sys.stderr)
        return 1
    finally:
        listener.close()
        if gateway is not None:
            stop_process(gateway, timeout_s=35)  # above gunicorn's graceful_timeout
        for server in models:
            server.stop()
        mocks.stop()


if __name__ == "__main__":
    sys.exit(main())
