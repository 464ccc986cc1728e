"""Structured logs: one JSON object per line on stdout, one line per request.

`configure_logging` is called where a process starts serving (`gateway.asgi`, `gateway.wsgi`),
never on import of the package, so tests and embedding applications keep their own logging.

Nothing is formatted or written on the serving loop: a record is kept as it is, and a thread
of its own formats the records as JSON and writes them, in batches every `WRITE_EVERY_S`
(20 ms), flushed, so lines appear within that under gunicorn. A worker forked from a process
that had configured logging gets a writer of its own. `flush` writes everything logged so far.

The request line (`gateway.access`, message ``request``) carries `request_id`, `method`,
`path`, `status`, `latency_ms`, and for `/recommendation` `complete` and `sources`, each
source's status and attempts, and `trace_id` when the request is traced
(`gateway.observability.tracing`). The web layer (`gateway.web.hooks`) passes each of them to
`log_request`: this module knows no
web framework. Errors carry their traceback in `exc_info`, in the log only.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from pythonjsonlogger.json import JsonEncoder, JsonFormatter

from gateway.core.outcome import Outcome

__all__ = ["access_log", "configure_logging", "flush", "log_request"]

access_log = logging.getLogger("gateway.access")

_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"
_RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}


# How often the writer thread writes what was logged meanwhile.
WRITE_EVERY_S = 0.02


class _BatchWriter(logging.Handler):
    """Keeps records as they come; a thread of its own formats and writes them, in batches.

    Logging costs the serving loop an append to a deque: no formatting, no lock, no wake-up of
    another thread (a queue's would be a system call per record). Every `WRITE_EVERY_S` the
    writer thread formats what has come and writes it in one call, flushed.
    """

    def __init__(self, stream: IO[str], formatter: logging.Formatter):
        super().__init__()
        self.setFormatter(formatter)
        self.stream = stream
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._writing = threading.Lock()
        self._stopped = False
        # Set by the first record after a write, so that an idle gateway wakes no thread.
        self._due = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # Without the handler's lock: a deque's append is atomic.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)
        if not self._due.is_set():
            self._due.set()

    def flush(self) -> None:
        """Format and write every record logged so far."""
        with self._writing:
            lines = []
            while self._records:
                record = self._records.popleft()
                try:
                    lines.append(self.format(record))
                except Exception:
                    self.handleError(record)
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()

    def close(self) -> None:
        """Write what is left and stop the thread."""
        self._stopped = True
        self._due.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.flush()
        super().close()

    def _run(self) -> None:
        # `_stopped` is read again after every clear: a `close` that comes while this thread
        # sleeps sets `_due` before the clear, and waiting on it then would wait for ever (the
        # worker hung at exit until gunicorn killed it, 30 s later).
        while not self._stopped:
            self._due.wait()
            if self._stopped:
                return
            time.sleep(WRITE_EVERY_S)  # what else comes meanwhile is written with it
            self._due.clear()
            self.flush()


class _JsonLines(JsonFormatter):
    """python-json-logger's `JsonFormatter` with its own options, writing the same lines faster.

    A record without an exception, a stack or a dict for its message (every request's line)
    is written here, in the steps of `JsonFormatter.format` that these options take, with one
    encoder made once instead of one per line and the time formatted once per second: 8.7-8.9 µs
    a request line where `JsonFormatter.format` took 11.5-12.2 (measured alone; the writer thread's
    CPU per request, serving, went from 29-36 µs to 24-30). Any other record is its.
    """

    def __init__(self) -> None:
        super().__init__(_FIELDS, rename_fields=_RENAMED)
        # What `JsonFormatter` gives `json.dumps` with these options: its encoder, ASCII only.
        self._encoder = JsonEncoder(ensure_ascii=True)
        self._required = [(field, _RENAMED.get(field, field)) for field in self._required_fields]
        self._second: tuple[int, str] = (-1, "")  # the last second formatted, and its text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """`logging.Formatter.formatTime`, its seconds formatted once for all their lines."""
        msec_format = self.default_msec_format
        if datefmt is not None or msec_format is None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime(self.default_time_format, time.localtime(second))
            self._second = (second, text)
        return msec_format % (text, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON object, as `JsonFormatter.format` writes it."""
        if record.exc_info or record.exc_text or record.stack_info or isinstance(record.msg, dict):
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        fields = record.__dict__
        line = {name: fields.get(field) for field, name in self._required}
        skip = self._skip_fields
        for key, value in fields.items():
            if key not in skip and not (hasattr(key, "startswith") and key.startswith("_")):
                line[key] = value
        return self._encoder.encode(line)


_writer: _BatchWriter | None = None


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send the `gateway` loggers to `stream` (default stdout) as JSON lines, off the loop."""
    global _writer
    formatter = _JsonLines()
    if _writer is not None:
        _writer.close()
    _writer = _BatchWriter(stream or sys.stdout, formatter)
    gateway = logging.getLogger("gateway")
    gateway.handlers = [_writer]
    gateway.setLevel(level)
    gateway.propagate = False


def flush() -> None:
    """Write every record logged so far, now."""
    if _writer is not None:
        _writer.flush()


def _close_writer() -> None:
    if _writer is not None:
        _writer.close()


def _writer_for_child() -> None:
    # The writer thread does not survive a fork, and its lock may have been held at that
    # moment: the child starts afresh, with the same output. What the parent had not written
    # yet is the parent's to write.
    global _writer
    if _writer is not None:
        _writer = _BatchWriter(_writer.stream, _writer.formatter or logging.Formatter())
        logging.getLogger("gateway").handlers = [_writer]


atexit.register(_close_writer)
os.register_at_fork(after_in_child=_writer_for_child)


def log_request(
    *,
    method: str,
    path: str,
    status: int,
    request_id: str | None,
    elapsed_s: float | None,
    trace_id: str | None = None,
    outcomes: Sequence[Outcome] | None = None,
) -> None:
    """Write the request's line: who asked what, what came back, and from which sources."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": method,
        "path": path,
        "status": status,
    }
    if trace_id is not None:
        fields["trace_id"] = trace_id
    if elapsed_s is not None:
        fields["latency_ms"] = round(elapsed_s * 1000, 1)
    if outcomes is not None:
        fields["complete"] = all(outcome.ok for outcome in outcomes)
        fields["sources"] = {o.name: {"status": o.status, "attempts": o.attempts} for o in outcomes}
    # The record built here: `Logger.info` would first walk the stack to find its caller.
    access_log.handle(
        access_log.makeRecord(
            access_log.name, logging.INFO, __file__, 0, "request", (), None, extra=fields
        )
    )
