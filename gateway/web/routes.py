"""The gateway's endpoint: `POST /recommendation`, read top to bottom.

Parse the frontend's body (`gateway.contract.schemas`), fan it out to every recommender (the
runtime's strategy, `gateway.fanout.strategies`), fuse the answers (`gateway.core.fusion`) as the
user's experiment arm
says, record what was shown (`gateway.feedback.service`, written off the loop), and respond with the
body the response model describes (`gateway.contract.answers`). The hooks around it (request id,
token, shedding, logging) are `gateway.web.hooks`'; the operations endpoints `gateway.web.ops`'.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, cast

from flask import Blueprint, Response, current_app, request

from gateway.contract.answers import (
    COMPLETE_HEADER,
    answer_body,
    unanswered_body,
    unanswered_status,
)
from gateway.contract.schemas import parse_request
from gateway.core.outcome import Deadline
from gateway.core.request_id import REQUEST_ID_HEADER
from gateway.observability import metrics
from gateway.web.exchange import current_exchange

if TYPE_CHECKING:
    from gateway.web.flask_app import GatewayFlask

__all__ = ["blueprint", "recommendation"]

blueprint = Blueprint("gateway", __name__)


@blueprint.post("/recommendation")
async def recommendation() -> Response:
    """Fan the request out to every recommender and merge what comes back."""
    app = cast("GatewayFlask", current_app)
    runtime = app.runtime
    settings = runtime.settings
    exchange = current_exchange()
    assert exchange is not None, "begun by gateway.hooks"
    request_id = exchange.request_id
    # The frontend's trace continued (W3C traceparent); the calls' spans are its children.
    with runtime.tracing.request(request.headers, request_id) as span:
        exchange.trace_id = span.trace_id
        wanted = parse_request(request.get_data(), settings.max_json_depth)

        forwarded = wanted.forwarded(settings.fusion_window)
        body = json.dumps(forwarded, separators=(",", ":")).encode()
        deadline = Deadline.after(
            settings.deadline_ms, start=exchange.received_at, queued_s=exchange.queued_s
        )
        outcomes = await runtime.fan_out(body, {REQUEST_ID_HEADER: request_id}, deadline)
        exchange.outcomes = outcomes
        if settings.metrics:
            metrics.observe_outcomes(outcomes, runtime.breaker_states())

        answered = [o for o in outcomes if o.ok]
        complete = len(answered) == len(outcomes)
        if not answered:
            status = unanswered_status(outcomes)
            span.answered(status, complete, None, None)
            body = unanswered_body(outcomes, request_id, exchange.trace_id, status)
            response = _json(status, body, complete)
            if status == 503:
                response.headers["Retry-After"] = str(settings.shed_retry_after_s)
            return response
        feedback = runtime.feedback
        assignment = feedback.assign(wanted.user_id, wanted.fusion)
        fused = app.fuser.fuse(
            outcomes, assignment.fusion, wanted.resultSize, request_id, assignment.weights
        )
        feedback.record(request_id, assignment, fused)

        span.answered(200, complete, fused.coverage, fused.fusion)
        body = answer_body(outcomes, answered, request_id, fused, assignment.arm)
        return _json(200, body, complete)


def _json(status: int, payload: bytes, complete: bool) -> Response:
    response = Response(payload, status=status, mimetype="application/json")
    response.headers[COMPLETE_HEADER] = "true" if complete else "false"
    return response
