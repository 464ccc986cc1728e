"""The record of one request/response exchange, kept by the web layer in one place.

`gateway.web.hooks` begins it when a request comes in (`begin_exchange`); the view, the error
handlers and the hook that finishes the response read and fill it through `current_exchange`.
Nothing else travels between modules through Flask's `g`: what a module outside the web layer
needs of it (the log line, the metrics) is passed to it as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import g

from gateway.core.outcome import Outcome

__all__ = ["Exchange", "begin_exchange", "current_exchange"]

# The one attribute of `g` the gateway uses.
_ATTRIBUTE = "gateway_exchange"


@dataclass(slots=True)
class Exchange:
    """What the gateway knows of the request it is serving.

    `received_at`: `time.perf_counter()` when it came in; `queued_s`: how long it then waited
    for admission (`gateway.serving.asgi_app`); `trace_id`: set while it is traced;
    `outcomes`: each recommender's, once fanned out; `admitted`: it holds an admission slot
    (served as WSGI); `shed`: it was answered 503 for want of one.
    """

    request_id: str
    received_at: float
    trace_id: str | None = None
    queued_s: float = 0.0
    outcomes: list[Outcome] | None = None
    admitted: bool = False
    shed: bool = False


def begin_exchange(request_id: str, received_at: float, queued_s: float = 0.0) -> Exchange:
    """Start the record of the request in this context."""
    exchange = Exchange(request_id, received_at, queued_s=queued_s)
    setattr(g, _ATTRIBUTE, exchange)
    return exchange


def current_exchange() -> Exchange | None:
    """The record of the request being served; None outside a request or before it began."""
    if not g:
        return None
    exchange: Exchange | None = g.get(_ATTRIBUTE)
    return exchange
