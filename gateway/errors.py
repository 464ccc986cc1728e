"""The gateway's exceptions and its one JSON error shape.

Exception tree::

    GatewayError
    ├── ConfigError                  settings that do not validate; stops start-up
    ├── ClientClosedError            a recommender client used after its session closed
    ├── RequestError                 the frontend's request is wrong (4xx)
    └── RecommenderError             one recommender failed; becomes a `sources` entry
        ├── RecommenderTimeout       no answer within the call's time budget
        ├── RecommenderUnavailable   refused, reset, or answered with an error status
        ├── BadRecommenderResponse   answered 2xx with a body that is not JSON, or too large
        └── CircuitOpen              not called: its circuit breaker is open

Library errors (the HTTP client's, pydantic's) are translated into these at one boundary each
(`gateway.clients`; pydantic's through `validation_problems` in `gateway.routes` and
`gateway.config`), so nothing else sees them.

Every 4xx and 5xx the gateway sends has the body
``{"error": {"status": 422, "message": "..."}, "request_id": "..."}``, and ``"trace_id"``
when the request is traced; `error_body`
builds it and `register_error_handlers` routes every exception through it. Tracebacks
go to the log with the request id, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, json
from werkzeug.exceptions import HTTPException

from gateway.outcome import SourceStatus

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "BadRecommenderResponse",
    "CircuitOpen",
    "ClientClosedError",
    "ConfigError",
    "GatewayError",
    "RecommenderError",
    "RecommenderTimeout",
    "RecommenderUnavailable",
    "RequestError",
    "error_body",
    "error_response",
    "register_error_handlers",
    "validation_problems",
    "validation_summary",
]

log = logging.getLogger("gateway")


def validation_problems(exc: ValidationError, top_level: str = "") -> list[dict[str, str]]:
    """Each problem pydantic found: the field's dotted path (`top_level` if none) and message."""
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or top_level,
            "message": error["msg"],
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]


def validation_summary(problems: list[dict[str, str]]) -> str:
    """The problems on one line: ``field: message; ...``."""
    return "; ".join(f"{problem['field']}: {problem['message']}" for problem in problems)


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The settings do not validate; the message names the field."""


class ClientClosedError(GatewayError):
    """A recommender client was used after its session was closed."""


class RequestError(GatewayError):
    """The frontend's request cannot be served as sent."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


class RecommenderError(GatewayError):
    """One recommender did not give a usable answer.

    `retryable` says whether the same call may be tried again (see `gateway.resilience`);
    `retry_after_s` carries the recommender's `Retry-After`, if it sent one.
    """

    status: SourceStatus = "error"

    def __init__(
        self,
        recommender: str,
        reason: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{recommender}: {reason}")
        self.recommender = recommender
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class RecommenderTimeout(RecommenderError):
    """The recommender did not answer within its time budget."""

    status: SourceStatus = "timeout"


class RecommenderUnavailable(RecommenderError):
    """The recommender refused or dropped the connection, or answered an error status."""


class BadRecommenderResponse(RecommenderError):
    """The recommender answered a body that is not JSON, or beyond the gateway's limits."""


class CircuitOpen(RecommenderError):
    """The recommender was not called: its circuit breaker is open."""

    status: SourceStatus = "circuit_open"


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """Build the one JSON error shape, with the current request id when there is one."""
    body: dict[str, Any] = {"error": {"status": status, "message": message}}
    body["error"].update({k: v for k, v in extra.items() if v is not None})
    request_id = g.get("request_id") if g else None
    if request_id is not None:
        body["request_id"] = request_id
    # Set while the request is traced (`gateway.tracing`): the error leads to its trace.
    trace_id = g.get("trace_id") if g else None
    if trace_id is not None:
        body["trace_id"] = trace_id
    return body


def error_response(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    """A JSON error response in the one shape every 4xx and 5xx uses."""
    response = Response(
        json.dumps(error_body(status, message, **extra)),
        status=status,
        mimetype="application/json",
    )
    if headers:
        response.headers.update(headers)
    return response


_HTTP_MESSAGES = {
    404: "no such endpoint: {method} {path}",
    405: "method {method} is not allowed on {path}; allowed: {allowed}",
    413: "request body is larger than the limit of {limit} bytes",
}


def _http_error(exc: HTTPException) -> Response:
    from flask import current_app, request

    status = exc.code or 500
    template = _HTTP_MESSAGES.get(status)
    headers: dict[str, str] = {}
    allowed = ""
    if status == 405:
        valid = getattr(exc, "valid_methods", None) or []
        allowed = ", ".join(sorted(valid))
        headers["Allow"] = allowed
    if template is not None:
        message = template.format(
            method=request.method,
            path=request.path,
            allowed=allowed,
            limit=current_app.config.get("MAX_CONTENT_LENGTH"),
        )
    else:
        message = (exc.description or exc.name).rstrip(".")
    return error_response(status, message, headers=headers)


def _request_error(exc: RequestError) -> Response:
    return error_response(exc.status, exc.message, details=exc.details)


def _unexpected_error(exc: Exception) -> Response:
    request_id = g.get("request_id") if g else None
    log.exception(
        "unhandled error serving request %s", request_id, extra={"request_id": request_id}
    )
    return error_response(500, "internal gateway error; the request id is in the gateway log")


def register_error_handlers(app: Flask) -> None:
    """Route every exception a view can raise to a JSON error response."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RequestError, _request_error)
    app.register_error_handler(Exception, _unexpected_error)
