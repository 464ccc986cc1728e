"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py gateway.asgi:app``.

Flags on the command line (`--bind`, `--workers`, `--access-logfile -`, ...), or in
`GUNICORN_CMD_ARGS`, override this file; `WEB_CONCURRENCY` sets the number of workers. The
gateway's `server` setting (`GATEWAY_SERVER=gthread`) picks the serving design.

`kill -HUP <master>` reloads the config, as nginx does: the master validates it first, and an
invalid one is refused with a logged error naming the field while the workers keep serving;
a valid one is pinned (`gateway.config.pin_settings`) and gunicorn replaces the workers, which
build their app from it. gunicorn executes this file again on every reload: what it sets up
once per master (the metrics directory) is remembered in the environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

bind = "127.0.0.1:5000"
# The heartbeat file lives in memory, as gunicorn's docs advise (a disk-backed /tmp stalls).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# All of a request's I/O waits on one event loop per worker, so workers only need to cover the
# CPU work (parsing, merging, serialising): one per core.
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))


worker_connections = 1000
keepalive = 15

# It does not bound a request (the gateway's own deadline does); it is the heartbeat after
# which a stuck worker is restarted.
timeout = 30
graceful_timeout = 30

# Never preload: the worker loop must be created after the fork. (The runtime also checks
# the pid, so a preloaded app still works.)
preload_app = False

# Off: gunicorn's access log costs ~3% of a worker's CPU; `--access-logfile -` turns it on.
accesslog = None
errorlog = "-"
loglevel = "info"


# Prometheus multiprocess mode: every worker writes its metrics into one directory, which
# `/metrics` merges. It must be set before any worker imports prometheus_client, so here, in
# the master; a directory given by the environment is emptied of a previous run's files.
# Only once per master: on a reload, the running workers' files are in it, and must stay.
# (Not a GATEWAY_ variable: those are settings.)
_METRICS_DIR_OWNER = "FUSION_GATEWAY_METRICS_DIR_OWNED"
if _METRICS_DIR_OWNER not in os.environ:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        os.environ[_METRICS_DIR_OWNER] = "no"
        for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
            stale.unlink()
    else:
        os.environ[_METRICS_DIR_OWNER] = "yes"
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
_METRICS_DIR_OWNED = os.environ[_METRICS_DIR_OWNER] == "yes"


def _server() -> str:
    # After the metrics directory is set: this imports the gateway, and prometheus-client with
    # it. A config that does not load is reported by `on_starting`, with the field it names; on
    # a reload, the settings just validated are pinned.
    from gateway.config.settings import load_settings, pinned_settings
    from gateway.core.errors import ConfigError

    pinned = pinned_settings()
    if pinned is not None:
        return pinned.server
    try:
        return load_settings().server
    except ConfigError:
        return "uvicorn"


if _server() == "gthread":
    # A thread per request: each holds its thread while its view waits on the worker's loop
    # thread, so the threads bound the requests a worker serves. There are more of them than
    # `max_in_flight` (200), so that requests above it are answered 503 at once rather than
    # queueing behind busy threads.
    worker_class = "gateway.worker.ThreadWorker"
    threads = 256
else:
    # One event loop serves HTTP and runs the fan-out; connections cost no thread, and the
    # gateway's `http:` settings bound them (gateway/serving/edge.py).
    worker_class = "gateway.worker.UvicornWorker"


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (in-flight requests) from the merged metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """Remove the metrics directory this configuration created."""
    if _METRICS_DIR_OWNED:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def on_starting(server: Any) -> None:
    """Validate the settings in the master, so a bad config stops start-up with one message.

    The settings validated are pinned for the workers, and a reload validates before it
    replaces any worker.
    """
    from gateway.config.settings import load_settings, pin_settings
    from gateway.core.errors import ConfigError
    from gateway.observability.tracing import check_installed

    try:
        settings = load_settings()
        # Here too: a worker that cannot start is replaced by another that cannot, for ever.
        check_installed(settings.tracing)
        pin_settings(settings)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr, flush=True)
        on_exit(server)
        sys.exit(1)
    _validate_reloads(server)


def _validate_reloads(server: Any) -> None:
    """Make a reload (SIGHUP) validate the config before gunicorn stops a worker.

    gunicorn's own reload executes this file again, starts new workers and stops the old ones;
    with a config the workers cannot load, every new worker would fail to boot, again and
    again, and nothing would serve. Installed once, on the master itself: this file's next
    executions do not run `on_starting`.
    """
    from gateway.config.settings import describe_source, load_settings, pin_settings
    from gateway.core.errors import ConfigError
    from gateway.observability.tracing import check_installed

    reload = server.reload

    def reload_if_valid() -> None:
        try:
            settings = load_settings()
            check_installed(settings.tracing)
        except ConfigError as exc:
            server.log.error(
                "gateway: config refused, workers keep serving the previous one: %s", exc
            )
            return
        pin_settings(settings)
        server.log.info(
            "gateway: config accepted from %s; replacing the workers", describe_source()
        )
        reload()

    server.reload = reload_if_valid


def post_worker_init(worker: Any) -> None:
    """Leave Ctrl-C to the master, which tells each worker to quit once.

    A terminal's Ctrl-C reaches every process in the group; a gthread worker that handles both
    the SIGINT and then the master's SIGQUIT re-enters its thread pool's shutdown and hangs
    until the master kills it after `graceful_timeout`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_exit(server: Any, worker: Any) -> None:
    """Close the worker's recommender session as the worker exits (gthread's loop thread).

    Under the uvicorn worker, the ASGI lifespan has closed it already.
    """
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "runtime", None)
    if runtime is not None:
        runtime.close()
