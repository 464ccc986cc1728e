"""Structured logs: one JSON object per line on stdout, one line per request.

`configure_logging` is called where a process starts serving (`gateway.asgi`, `gateway.wsgi`),
never on import of the package, so tests and embedding applications keep their own logging.

Nothing is formatted or written on the serving loop: a record is put on a queue
(`QueueHandler`) and a thread of its own (`QueueListener`) formats it as JSON and writes it,
flushing each line, so lines appear at once under gunicorn. A worker forked from a process
that had configured logging gets a queue and a thread of its own. `flush` waits until every
record logged so far is written.

The request line (`gateway.access`, message ``request``) carries `request_id`, `method`,
`path`, `status`, `latency_ms`, and for `/recommendation` `complete` and `sources`, each
source's status and attempts. Errors carry their traceback in `exc_info`, in the log only.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import IO, Any

from flask import Response, g, request
from pythonjsonlogger.json import JsonFormatter

__all__ = ["access_log", "configure_logging", "flush", "log_request"]

access_log = logging.getLogger("gateway.access")

_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"


class _Enqueue(logging.handlers.QueueHandler):
    """Puts records on the writer thread's queue as they are: it formats them, not the caller."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The stock one formats the message here, and drops the traceback, so that a record
        # can cross to another process; this queue stays in the process.
        return record


class _Writer:
    """The queue, the handler that fills it and the thread that drains it, for one process."""

    def __init__(self, target: logging.Handler):
        self.target = target
        self.queue: queue.Queue[logging.LogRecord] = queue.Queue()
        self.handler = _Enqueue(self.queue)
        self.listener = logging.handlers.QueueListener(self.queue, target)
        self.listener.start()

    def stop(self) -> None:
        """Write what is queued, then stop the thread."""
        if self.listener._thread is not None:  # stop() is not idempotent
            self.listener.stop()


_writer: _Writer | None = None


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send the `gateway` loggers to `stream` (default stdout) as JSON lines, off the loop."""
    global _writer
    target = logging.StreamHandler(stream or sys.stdout)
    target.setFormatter(
        JsonFormatter(
            _FIELDS,
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    if _writer is not None:
        _writer.stop()
    _writer = _Writer(target)
    gateway = logging.getLogger("gateway")
    gateway.handlers = [_writer.handler]
    gateway.setLevel(level)
    gateway.propagate = False


def flush() -> None:
    """Wait until every record logged so far is written."""
    if _writer is not None:
        _writer.queue.join()


def _stop_writer() -> None:
    if _writer is not None:
        _writer.stop()


def _writer_for_child() -> None:
    # The writer thread does not survive a fork, and the queue's lock may have been held at
    # that moment: the child starts both afresh, with the same output.
    global _writer
    if _writer is not None:
        _writer = _Writer(_writer.target)
        logging.getLogger("gateway").handlers = [_writer.handler]


atexit.register(_stop_writer)
os.register_at_fork(after_in_child=_writer_for_child)


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
