"""The hooks every request passes through, before and after its view.

Before: its id is taken or made and its record begun (`gateway.web.exchange`); a protected
endpoint (`/recommendation`, `/feedback` and `/experiments`; `/metrics` when
`metrics_require_token`) without a valid API token is answered 401; a `/recommendation` this
worker has no room for is answered 503 (served as WSGI: under the uvicorn worker
`gateway.serving.asgi_app` admits or sheds before Flask runs). After: the id is echoed, the request
logged and counted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from flask import Flask, Response, current_app, request

from gateway.contract.security import TOKEN_HEADER
from gateway.core.errors import RequestError
from gateway.core.request_id import (
    REQUEST_ID_HEADER,
    REQUEST_ID_MAX,
    new_request_id,
    valid_request_id,
)
from gateway.observability import metrics
from gateway.observability.logs import log_request
from gateway.web.exchange import begin_exchange, current_exchange
from gateway.web.http_errors import error_response

if TYPE_CHECKING:
    from gateway.web.flask_app import GatewayFlask

__all__ = [
    "ADMITTED",
    "ARRIVED",
    "BODY",
    "EXPERIMENTS_ENDPOINT",
    "FEEDBACK_ENDPOINT",
    "METRICS_ENDPOINT",
    "QUEUED",
    "RECOMMENDATION_ENDPOINT",
    "register_hooks",
    "request_body",
]

# Set in the WSGI environ of a request admitted before Flask (`gateway.serving.asgi_app`).
ADMITTED = "gateway.admitted"
# When such a request arrived (`time.perf_counter()`), before it waited for a slot: its
# deadline, its logged latency and its metrics count from then. And how long it waited.
ARRIVED = "gateway.arrived"
QUEUED = "gateway.queued"
# The body as the ASGI app read it (`gateway.serving.asgi_app`): a view takes it from there, not
# through werkzeug's stream wrappers (`request_body`).
BODY = "gateway.body"

# The endpoints the hooks treat apart, as their blueprints name them (`gateway.web.routes`,
# `gateway.web.feedback_routes`, `gateway.web.ops`): the recommendation and the feedback need a
# token when keys are configured (a frontend sends both), and so does the experiments' report
# (counts, arms and weights are business data); the recommendation can be shed; the metrics
# need one when `metrics_require_token` says so (Prometheus scrapes without headers).
RECOMMENDATION_ENDPOINT = "gateway.recommendation"
FEEDBACK_ENDPOINT = "feedback.receive_feedback"
METRICS_ENDPOINT = "ops.metrics_endpoint"
EXPERIMENTS_ENDPOINT = "feedback.experiments"
_ALWAYS_PROTECTED = frozenset({RECOMMENDATION_ENDPOINT, FEEDBACK_ENDPOINT, EXPERIMENTS_ENDPOINT})
_OPERATORS = frozenset({METRICS_ENDPOINT})


def register_hooks(app: Flask) -> None:
    """Run the gateway's hooks on every request of `app`, in this order."""
    app.before_request(_assign_request_id)
    app.before_request(_require_token)
    app.before_request(_shed_when_full)
    app.teardown_request(_leave)
    app.after_request(_finish_response)


def request_body() -> bytes:
    """The request's body: as the ASGI app read it, else (served as WSGI) werkzeug's."""
    body: bytes | None = request.environ.get(BODY)
    return body if body is not None else request.get_data()


def _app() -> GatewayFlask:
    return cast("GatewayFlask", current_app)


def _assign_request_id() -> None:
    environ = request.environ
    received_at = environ.get(ARRIVED) or time.perf_counter()
    queued_s = environ.get(QUEUED, 0.0)
    supplied = request.headers.get(REQUEST_ID_HEADER)
    if supplied is not None and valid_request_id(supplied):
        begin_exchange(supplied, received_at, queued_s)
        return
    begin_exchange(new_request_id(), received_at, queued_s)
    if supplied is not None:
        raise RequestError(
            400,
            f"header {REQUEST_ID_HEADER} must be 1 to {REQUEST_ID_MAX} visible ASCII characters",
        )


def _require_token() -> Response | None:
    """401 for a protected endpoint without a valid `X-Api-Token`, when keys are configured."""
    app = _app()
    tokens = app.tokens
    if not tokens.enabled:
        return None
    endpoint = request.endpoint
    protected = endpoint in _ALWAYS_PROTECTED or (
        endpoint in _OPERATORS and app.runtime.settings.metrics_require_token
    )
    if not protected:
        return None
    token = request.headers.get(TOKEN_HEADER)
    challenge = {"WWW-Authenticate": f'ApiKey header="{TOKEN_HEADER}"'}
    if token is None:
        return error_response(401, f"missing {TOKEN_HEADER} header", headers=challenge)
    if not tokens.allows(token):
        return error_response(401, f"invalid API token in {TOKEN_HEADER}", headers=challenge)
    return None


def _shed_when_full() -> Response | None:
    """Answer 503 at once when this worker already serves its limit of requests."""
    if request.endpoint != RECOMMENDATION_ENDPOINT or request.environ.get(ADMITTED):
        return None
    app = _app()
    runtime = app.runtime
    exchange = current_exchange()
    assert exchange is not None, "begun by the first hook"
    # The thread design sheds at the limit: a request waiting here would hold a thread.
    if runtime.admission.try_enter():
        exchange.admitted = True
        return None
    runtime.admission.count_shed()
    runtime.shed += 1
    exchange.shed = True
    shed = app.shed_answer
    body = shed.body("limit", runtime.admission.limit, exchange.request_id)
    return Response(body, status=503, headers=shed.headers, mimetype="application/json")


def _leave(error: BaseException | None) -> None:
    exchange = current_exchange()
    if exchange is not None and exchange.admitted:
        exchange.admitted = False
        _app().runtime.admission.leave(time.perf_counter() - exchange.received_at)


def _finish_response(response: Response) -> Response:
    """Echo the request id, log the request, and count it in the metrics."""
    exchange = current_exchange()
    if exchange is None:
        return response
    response.headers[REQUEST_ID_HEADER] = exchange.request_id
    settings = _app().runtime.settings
    elapsed_s = time.perf_counter() - exchange.received_at
    if settings.log_requests:
        log_request(
            method=request.method,
            path=request.path,
            status=response.status_code,
            request_id=exchange.request_id,
            elapsed_s=elapsed_s,
            trace_id=exchange.trace_id,
            outcomes=exchange.outcomes,
        )
    if settings.metrics:
        route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        if exchange.shed:
            metrics.observe_shed(route, elapsed_s, "limit")
        else:
            metrics.observe_request(route, response.status_code, elapsed_s)
    return response
