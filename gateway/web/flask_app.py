"""`GatewayFlask`: Flask, running the gateway's ``async def`` views on the worker's event loop.

Every module of the web layer types its app as this class; `gateway.web.app.create_app` builds
one and registers the routes, hooks and error handlers on it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from flask import Flask, has_request_context, request
from werkzeug.exceptions import GatewayTimeout

from gateway.config import Settings
from gateway.contract.answers import ShedAnswer
from gateway.contract.security import TokenCheck
from gateway.core.fusion import Fuser
from gateway.runtime.portal import await_, in_portal
from gateway.runtime.worker_runtime import WorkerRuntime

__all__ = ["VIEW_GRACE_S", "GatewayFlask", "view_limit_s"]

# How long past the deadline a view may run before the waiting thread gives up on it; the
# view's own deadline normally ends it long before.
VIEW_GRACE_S = 2.0


def view_limit_s(settings: Settings) -> float:
    """How long a view may run before the gateway gives up on it (504).

    Past what any view waits for on its own, plus `VIEW_GRACE_S`: a `/recommendation` its
    deadline; a `/feedback` its events' turn (`answer_within_ms`) and one store operation
    (`store_timeout_ms`), so that it is never cut off once its events may be counted.
    """
    feedback = settings.feedback
    own_ms = max(settings.deadline_ms, feedback.answer_within_ms + feedback.store_timeout_ms)
    return own_ms / 1000 + VIEW_GRACE_S


class GatewayFlask(Flask):
    """Flask, running ``async def`` views on the worker's long-lived event loop.

    Flask's default `async_to_sync` (asgiref) gives each call a new event loop, which would
    orphan the worker's shared connection pool. Served by `gateway.asgi`, Flask runs in a
    greenlet portal on the serving loop itself, and the view's coroutine is awaited there
    (`gateway.runtime.portal`).
    Served as WSGI, the coroutine is handed to the runtime's loop thread, and the request's
    thread waits for it (Flask's "Combining with async/await" pattern, `docs/gevent.rst`).

    What `create_app` builds once from the settings hangs on it: `runtime` (the worker's loop,
    pool and clients), `tokens`, `fuser`, `shed_answer` and `openapi_document`.
    """

    runtime: WorkerRuntime
    tokens: TokenCheck
    fuser: Fuser
    shed_answer: ShedAnswer
    openapi_document: str

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Flask's, made once per view: Flask asks for it on every request."""
        made = self._sync_views.get(func)
        if made is None:
            made = self._sync_views[func] = super().ensure_sync(func)
        return made

    @functools.cached_property
    def _sync_views(self) -> dict[Callable[..., Any], Callable[..., Any]]:
        return {}

    def async_to_sync(self, func: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
        """Return a sync function that runs `func` on the worker loop and waits for it."""
        runtime = self.runtime
        wait_s = view_limit_s(runtime.settings)

        @functools.wraps(func)
        def run_on_worker_loop(*args: Any, **kwargs: Any) -> Any:
            if in_portal():
                # On the serving loop: the body is in already (the ASGI app read it).
                return await_(_within(func(*args, **kwargs), wait_s))
            if has_request_context():
                # Read the body here, in the request's own thread: a slow upload must never
                # block the loop that every request of this worker shares. Flask caches it.
                request.get_data()
            runtime.start()  # the loop thread, the first time this process needs it
            try:
                return runtime.run(func(*args, **kwargs), timeout=wait_s)
            except TimeoutError as exc:
                raise GatewayTimeout("the gateway did not finish within its deadline") from exc

        return run_on_worker_loop


async def _within(coroutine: Coroutine[Any, Any, Any], seconds: float) -> Any:
    bound = asyncio.timeout(seconds)
    try:
        async with bound:
            return await coroutine
    except TimeoutError as exc:
        if bound.expired():
            raise GatewayTimeout("the gateway did not finish within its deadline") from exc
        raise
