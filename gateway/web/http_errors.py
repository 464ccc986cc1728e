"""The one JSON error shape, and the handlers that send every exception to it.

Every 4xx and 5xx the gateway sends has the body
``{"error": {"status": 422, "message": "..."}, "request_id": "..."}``, and ``"trace_id"``
when the request is traced (the `gateway.contract.schemas.ErrorDocument` model); `error_body` builds
it and `register_error_handlers` routes every exception through it. Tracebacks go to the log
with the request id, never to the client.

This is the web layer's: the exceptions themselves (`gateway.core.errors`) know nothing of HTTP
responses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, json, request
from werkzeug.exceptions import HTTPException

from gateway.core.errors import RequestError
from gateway.web.exchange import current_exchange

__all__ = ["error_body", "error_response", "register_error_handlers"]

log = logging.getLogger("gateway")


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """Build the one JSON error shape, with the current request's id (and trace) if any."""
    body: dict[str, Any] = {"error": {"status": status, "message": message}}
    body["error"].update({k: v for k, v in extra.items() if v is not None})
    exchange = current_exchange()
    if exchange is not None:
        body["request_id"] = exchange.request_id
        # Set while the request is traced (`gateway.observability.tracing`): the error leads to its
        # trace.
        if exchange.trace_id is not None:
            body["trace_id"] = exchange.trace_id
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
    exchange = current_exchange()
    request_id = exchange.request_id if exchange is not None else None
    log.exception(
        "unhandled error serving request %s", request_id, extra={"request_id": request_id}
    )
    return error_response(500, "internal gateway error; the request id is in the gateway log")


def register_error_handlers(app: Flask) -> None:
    """Route every exception a view can raise to a JSON error response."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RequestError, _request_error)
    app.register_error_handler(Exception, _unexpected_error)
