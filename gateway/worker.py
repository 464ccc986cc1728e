"""gunicorn's worker classes for the gateway: `UvicornWorker` (the default) and `ThreadWorker`.

`gunicorn.conf.py` picks one by the `server` setting (`GATEWAY_SERVER`). Both serve either app
path, `gateway.asgi:app` or `gateway.wsgi:app`: each takes the form it needs from what it is
given, so one command serves both designs.

`UvicornWorker` is the `uvicorn-worker` package's worker (uvloop, httptools): one event loop
per worker process serves HTTP, runs Flask in a greenlet portal and fans out, with the
gateway's HTTP edge (`gateway.serving.edge`: connection cap, header timeout, JSON errors from the
HTTP layer). Before it serves, the worker raises its open-file limit to the hard limit, and the
connection cap is held below what that limit leaves after the recommender pool.

`ThreadWorker` is gunicorn's `gthread` worker, the design before it: a thread per request,
each view handed to the runtime's loop thread. It starts the runtime eagerly (so `/readyz` is
true from the start), hands the GIL over every 0.5 ms instead of 5 ms (with dozens of request
threads runnable, the loop thread could otherwise wait up to 5 ms for it), and sends its
heartbeat at most every `HEARTBEAT_EVERY_S` (gthread's loop turns twice per request, and the
syscall cost ~7% of a worker's CPU under load).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as GunicornThreadWorker
from uvicorn_worker import UvicornWorker as PackagedUvicornWorker

from gateway.config.settings import HttpSettings
from gateway.serving.asgi_app import GatewayASGI, settle_heap
from gateway.serving.edge import protocol_for
from gateway.web.flask_app import GatewayFlask

__all__ = ["GIL_SWITCH_INTERVAL_S", "HEARTBEAT_EVERY_S", "ThreadWorker", "UvicornWorker"]

HEARTBEAT_EVERY_S = 0.5
GIL_SWITCH_INTERVAL_S = 0.0005
# Descriptors kept for the listening socket, logs, metric files and the like.
_SPARE_FDS = 128


class UvicornWorker(PackagedUvicornWorker):  # type: ignore[misc]
    """uvicorn-worker's worker: uvloop, httptools, the gateway's edge, no proxy-header parsing."""

    CONFIG_KWARGS: dict[str, Any] = {  # noqa: RUF012 - the base class reads it so
        "loop": "uvloop",
        "http": "httptools",
        "ws": "none",
        "lifespan": "on",
        # X-Forwarded-* would change nothing the gateway uses, and cost each request.
        "proxy_headers": False,
        "server_header": False,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn logs a line per request when its access logger has handlers; gunicorn's
        # `accesslog` (off by default) decides.
        self.config.access_log = bool(self.cfg.accesslog)

    def load_wsgi(self) -> None:
        """Load the app, as ASGI; give the HTTP edge the app's limits."""
        super().load_wsgi()
        app: Any = getattr(self, "wsgi", None)
        if isinstance(app, GatewayFlask):
            app = self.wsgi = GatewayASGI(app)
        if isinstance(app, GatewayASGI):
            settings = app.runtime.settings
            self.config.http = protocol_for(_within_fd_limit(settings.http, settings.pool.limit))


def _within_fd_limit(http: HttpSettings, pool_limit: int) -> HttpSettings:
    """`http` with its connection cap lowered, if need be, to what open files allow."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY:
        return http
    room = max(soft - pool_limit - _SPARE_FDS, 1)
    if http.max_connections <= room:
        return http
    return http.model_copy(update={"max_connections": room})


class ThreadWorker(GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, with an eager gateway runtime and a rate-limited heartbeat."""

    _last_heartbeat = 0.0

    def init_process(self) -> None:
        """Set the GIL switch interval for this worker process, then run the worker."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        super().init_process()

    def load_wsgi(self) -> None:
        """Load the app, as WSGI, then start its runtime in this (forked) worker process."""
        super().load_wsgi()
        app: Any = getattr(self, "wsgi", None)
        if isinstance(app, GatewayASGI):
            app = self.wsgi = app.flask
        if isinstance(app, GatewayFlask):
            app.runtime.start()
            settle_heap()

    def notify(self) -> None:
        """Tell the arbiter this worker is alive, at most every `HEARTBEAT_EVERY_S`."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_EVERY_S:
            self._last_heartbeat = now
            super().notify()
