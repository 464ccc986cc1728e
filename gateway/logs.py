"""Structured logs: one JSON object per line on stdout, one line per request.

`configure_logging` is called where a process starts serving (`gateway.wsgi`), never on import
of the package, so tests and embedding applications keep their own logging. Each record is
flushed as it is written (a `StreamHandler` flushes per record), so lines appear at once
under gunicorn without `print(..., flush=True)` tricks.

The request line (`gateway.access`, message ``request``) carries `request_id`, `method`,
`path`, `status`, `latency_ms`, and for `/recommendation` `complete` and `sources`, each
source's status and attempts. Errors carry their traceback in `exc_info`, in the log only.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

from flask import Response, g, request
from pythonjsonlogger.json import JsonFormatter

__all__ = ["access_log", "configure_logging", "log_request"]

access_log = logging.getLogger("gateway.access")

_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send the `gateway` loggers to `stream` (default stdout) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            _FIELDS,
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    gateway = logging.getLogger("gateway")
    gateway.handlers = [handler]
    gateway.setLevel(level)
    gateway.propagate = False


def log_request(response: Response, enabled: bool = True) -> None:
    """Write the request's line: who asked what, what came back, and from which sources."""
    if not enabled or not access_log.isEnabledFor(logging.INFO):
        return
    started = g.get("received_at")
    fields: dict[str, Any] = {
        "request_id": g.get("request_id"),
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
    }
    if started is not None:
        fields["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    outcomes = g.get("outcomes")
    if outcomes is not None:
        fields["complete"] = all(outcome.ok for outcome in outcomes)
        fields["sources"] = {o.name: {"status": o.status, "attempts": o.attempts} for o in outcomes}
    access_log.info("request", extra=fields)
