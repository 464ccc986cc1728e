"""Structured logs: a JSON line per request, errors with their traceback in the log only."""

from __future__ import annotations

import copy
import datetime
import io
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

import pytest
import requests

from gateway.observability.logs import _BatchWriter, configure_logging, flush
from gateway.web.app import create_app
from mock_recommenders import MockFleet, MockFleetProcess
from tests.helpers import Serve, gunicorn, lines, settings_for, wait_until


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The `gateway` loggers writing JSON into a buffer, restored afterwards."""
    logger = logging.getLogger("gateway")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()
    configure_logging(stream=stream)
    yield stream
    logger.handlers, logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_one_json_line_per_request_with_its_sources(
    fleet: MockFleet, serve: Serve, log_stream: io.StringIO
) -> None:
    app = create_app(settings_for(fleet))

    @app.get("/explode")
    def explode() -> NoReturn:
        raise RuntimeError("a secret detail")

    url = serve(app)
    fleet.set_behaviour("trd", status=503)
    requests.post(f"{url}/recommendation", json={}, headers={"X-Request-ID": "L-1"}, timeout=30)
    requests.post(
        f"{url}/recommendation", json={"resultSize": 0}, headers={"X-Request-ID": "L-2"}, timeout=30
    )
    response = requests.get(f"{url}/explode", headers={"X-Request-ID": "L-3"}, timeout=30)

    flush()  # written by the log thread, off the serving loop
    records = lines(log_stream.getvalue())
    by_id = {r["request_id"]: r for r in records if r["message"] == "request"}
    first = by_id["L-1"]
    assert (first["logger"], first["level"], first["status"]) == ("gateway.access", "INFO", 200)
    assert (first["method"], first["path"]) == ("POST", "/recommendation")
    assert first["complete"] is False
    assert first["sources"]["trd"] == {"status": "error", "attempts": 2}
    assert first["sources"]["sml"] == {"status": "ok", "attempts": 1}
    assert first["latency_ms"] > 0
    assert by_id["L-2"]["status"] == 422 and "sources" not in by_id["L-2"]
    assert by_id["L-3"]["status"] == 500
    (error,) = [r for r in records if r["level"] == "ERROR"]
    assert error["request_id"] == "L-3"
    assert "Traceback" in error["exc_info"] and "a secret detail" in error["exc_info"]
    assert "secret" not in response.text


@pytest.mark.slow
def test_under_gunicorn_the_lines_reach_stdout_at_once(fleet_process: MockFleetProcess) -> None:
    with gunicorn(fleet_process, "--workers", "2") as server:
        for i in range(3):
            requests.post(
                f"{server.url}/recommendation",
                json={},
                headers={"X-Request-ID": f"G-{i}"},
                timeout=30,
            )

        # No flush, no shutdown: the log thread writes each line as it comes.
        def logged() -> set[str | None]:
            records = lines(server.output())
            return {r.get("request_id") for r in records if r["message"] == "request"}

        wait_until(lambda: {"G-0", "G-1", "G-2"} <= logged(), 10, lambda: str(logged()))


def test_request_lines_can_be_switched_off(
    fleet: MockFleet, serve: Serve, log_stream: io.StringIO
) -> None:
    url = serve(create_app(settings_for(fleet, log_requests=False)))

    requests.post(f"{url}/recommendation", json={}, timeout=30)

    flush()
    assert [r for r in lines(log_stream.getvalue()) if r["message"] == "request"] == []


@pytest.mark.parametrize("pause_s", [0.0, 0.005, 0.01, 0.015])
def test_closing_the_writer_while_it_waits_to_write_ends_it(pause_s: float) -> None:
    # A close that comes while the writer thread sleeps before a write (as at a worker's exit,
    # just after its last lines) must end the thread, not leave it waiting for ever.
    stream = io.StringIO()
    writer = _BatchWriter(stream, logging.Formatter("%(message)s"))
    writer.handle(logging.makeLogRecord({"msg": "last words"}))
    time.sleep(pause_s)  # somewhere in the writer's 20 ms sleep
    closing = threading.Thread(target=writer.close)
    closing.start()
    closing.join(10)

    assert not closing.is_alive()
    assert stream.getvalue() == "last words\n"


def test_lines_are_written_as_python_json_logger_writes_them() -> None:
    # The gateway's formatter takes a shorter way for the common records; every line must be
    # the one `JsonFormatter` with the same options would write, byte for byte.
    from pythonjsonlogger.json import JsonFormatter

    from gateway.observability.logs import _FIELDS, _RENAMED, _JsonLines

    ours, theirs = _JsonLines(), JsonFormatter(_FIELDS, rename_fields=_RENAMED)
    logger = logging.getLogger("gateway.test")

    def record(*args: object, **kwargs: object) -> logging.LogRecord:
        made = logger.makeRecord("gateway.test", logging.INFO, __file__, 7, *args, **kwargs)  # type: ignore[arg-type]
        made.created = 1_700_000_000.5 + len(made.getMessage())  # seconds apart
        made.msecs = 500.0
        return made

    try:
        raise ValueError("détail")
    except ValueError:
        failure = sys.exc_info()
    records = [
        record("request", (), None, extra={"request_id": "r-1", "status": 200, "sources": {}}),
        record("worker %d shed %d", (7, 3), None, extra={"limit": 4, "ratio": 0.5}),
        record("é and \u2028", (), None, extra={"when": datetime.datetime(2024, 1, 2)}),
        record("odd", (), None, extra={"raw": b"\x00", "kind": ValueError, "_hidden": 1}),
        record("failed", (), failure),
        record({"a": 1}, (), None),
    ]
    for made in records:
        expected = theirs.format(copy.copy(made))
        assert ours.format(made) == expected
    # The time changes with the second, and never lags behind it.
    late = record("x", (), None)
    late.created += 1
    assert ours.format(copy.copy(late)) == theirs.format(late)
