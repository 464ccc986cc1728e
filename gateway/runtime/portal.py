"""A greenlet portal: run synchronous code on the event loop, letting it await coroutines.

Flask is synchronous: its `wsgi_app` calls a view and wants the view's result. The gateway's
view is a coroutine that must run on the worker's event loop, where the recommender session
lives. `run_sync(fn)` runs `fn` in a greenlet on the loop's own thread; when `fn` (deep inside
Flask) calls `await_(coroutine)`, the greenlet switches back to the task that started it, which
awaits the coroutine on the loop and switches back with its result. No thread, no hop: the
same pattern as SQLAlchemy's asyncio layer (`greenlet_spawn` / `await_only`) and greenback.

The greenlet shares the task's `contextvars` context, so what Flask sets there (the request and
app contexts behind `request` and `g`) is seen by the coroutine it awaits, and the reverse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import greenlet

__all__ = ["await_", "in_portal", "run_sync"]

T = TypeVar("T")


class _PortalGreenlet(greenlet.greenlet):
    """The greenlet `run_sync` runs its function in; `await_` switches out of it."""


async def run_sync(function: Callable[..., T], *args: Any) -> T:
    """Run `function(*args)` on this task; each `await_` inside it is awaited here."""
    driver = greenlet.getcurrent()
    portal = _PortalGreenlet(function, driver)
    # The same context object as this task: Flask's context variables cross both ways.
    portal.gr_context = driver.gr_context
    switched: Any = portal.switch(*args)
    while not portal.dead:
        try:
            result = await switched
        except BaseException as exc:  # every outcome goes back to the awaiter
            switched = portal.throw(exc)
        else:
            switched = portal.switch(result)
    value: T = switched
    return value


def in_portal() -> bool:
    """Whether the caller runs inside `run_sync`, where `await_` may be used."""
    return isinstance(greenlet.getcurrent(), _PortalGreenlet)


def await_(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` on the event loop from synchronous code running in `run_sync`."""
    current = greenlet.getcurrent()
    if not isinstance(current, _PortalGreenlet):
        raise RuntimeError("await_() needs a portal: call it from code run by run_sync()")
    driver = current.parent
    assert driver is not None, "a portal greenlet always has its driver as parent"
    result: T = driver.switch(awaitable)
    return result
