"""The gunicorn worker class: gunicorn's gthread worker, with the gateway's runtime started eagerly.

`ThreadWorker` is gunicorn's `gthread` worker with two changes:

- the worker process starts its gateway runtime (event loop thread and recommender session)
  right after it loads the app, so the first request does not pay for it and `/readyz` is
  true from the start;
- its heartbeat to the arbiter (a `utime` on a temporary file) is sent at most every
  `HEARTBEAT_EVERY_S`, not on every turn of its loop: gthread's loop turns about twice per
  request, and the syscall cost ~7% of a worker's CPU under load. The arbiter's `timeout`
  (30 s by default) is far above the interval.
"""

from __future__ import annotations

import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as GunicornThreadWorker

__all__ = ["HEARTBEAT_EVERY_S", "ThreadWorker"]

HEARTBEAT_EVERY_S = 0.5


class ThreadWorker(GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, with an eager gateway runtime and a rate-limited heartbeat."""

    _last_heartbeat = 0.0

    def load_wsgi(self) -> None:
        """Load the app, then start its runtime in this (forked) worker process."""
        super().load_wsgi()
        runtime: Any = getattr(self.wsgi, "extensions", {}).get("gateway")
        if runtime is not None:
            runtime.start()

    def notify(self) -> None:
        """Tell the arbiter this worker is alive, at most every `HEARTBEAT_EVERY_S`."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_EVERY_S:
            self._last_heartbeat = now
            super().notify()
