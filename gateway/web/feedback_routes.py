"""The feedback endpoints: `POST /feedback` (events on shown items) and `GET /experiments`.

Both read top to bottom: parse (`gateway.contract.feedback_schemas`), hand the blocking store work
to a thread (the worker's event loop never waits on SQLite or Redis), respond. The events go to the
worker's event thread, judged with those of concurrent requests (`gateway.feedback.judge`);
the report is read in a thread of the loop's executor (`asyncio.to_thread`). With feedback off
(no `feedback.store`) both answer 404 saying so; a store that fails, or that too many events
already wait for, answers 503, never 500. `/feedback` needs the API token as `/recommendation`
does; `/experiments` as `/metrics` does (`gateway.web.hooks`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from flask import Blueprint, Response, current_app

from gateway.contract.feedback_schemas import ParsedFeedback, parse_feedback
from gateway.feedback.impressions import FeedbackEvent
from gateway.feedback.records import EventResult, FeedbackStoreBusy, FeedbackStoreError
from gateway.observability import metrics
from gateway.web.hooks import request_body
from gateway.web.http_errors import error_response

if TYPE_CHECKING:
    from gateway.web.flask_app import GatewayFlask

__all__ = ["FEEDBACK_OFF", "blueprint"]

log = logging.getLogger("gateway")

blueprint = Blueprint("feedback", __name__)

FEEDBACK_OFF = (
    "feedback is off on this gateway: set feedback.store (GATEWAY_FEEDBACK__STORE, "
    "sqlite:///PATH or redis://host:port/N) to switch it on"
)
# A refused event's status: its request is unknown or expired (404), or it did not show it.
_STATUS = {EventResult.UNKNOWN_REQUEST: 404, EventResult.ITEM_NOT_SHOWN: 422}


def _app() -> GatewayFlask:
    return cast("GatewayFlask", current_app)


@blueprint.post("/feedback")
async def receive_feedback() -> Response:
    """Count users' events on the items an answer showed: one, or a batch."""
    runtime = _app().runtime
    settings = runtime.settings
    if not settings.feedback.enabled:
        return error_response(404, FEEDBACK_OFF)
    parsed = parse_feedback(request_body(), settings.max_json_depth, settings.feedback.max_events)
    try:
        results = await runtime.feedback.judge(parsed.events)
    except FeedbackStoreError as exc:
        return _store_failed(exc, "judge")
    return _receipt(parsed, results, settings.feedback.retention_s)


@blueprint.get("/experiments")
async def experiments() -> Response:
    """What feedback has counted: credit, pairwise preferences, arms, learnt weights."""
    runtime = _app().runtime
    if not runtime.settings.feedback.enabled:
        return error_response(404, FEEDBACK_OFF)
    try:
        report = await asyncio.to_thread(runtime.feedback.report)
    except FeedbackStoreError as exc:
        return _store_failed(exc, "report")
    return Response(json.dumps(report, separators=(",", ":")), mimetype="application/json")


def _receipt(
    parsed: ParsedFeedback, results: Sequence[EventResult], retention_s: float
) -> Response:
    accepted = sum(result is EventResult.ACCEPTED for result in results)
    duplicates = sum(result is EventResult.DUPLICATE for result in results)
    refused = [
        (index, _STATUS[result], _why(event, result, retention_s))
        for index, (event, result) in enumerate(zip(parsed.events, results, strict=True))
        if result in _STATUS
    ]
    if refused and not parsed.batch:
        _index, status, message = refused[0]
        return error_response(status, message)
    rejected = [{"index": i, "status": status, "message": why} for i, status, why in refused]
    if rejected and accepted + duplicates == 0:
        # All refused: 404 when every one named an unknown request, else 422.
        unknown = sum(status == 404 for _i, status, _why in refused)
        message = (
            f"none of the {len(refused)} events was accepted: {unknown} name an unknown or "
            f"expired request, {len(refused) - unknown} an item the answer did not show "
            "(see `rejected`)"
        )
        return error_response(404 if unknown == len(refused) else 422, message, rejected=rejected)
    if not rejected:
        # The common receipt, written as json.dumps would write it, for a fraction of its cost.
        text = f'{{"accepted": {accepted}, "duplicates": {duplicates}}}'
        return Response(text, status=202, mimetype="application/json")
    body = {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}
    return Response(json.dumps(body), status=202, mimetype="application/json")


def _why(event: FeedbackEvent, result: EventResult, retention_s: float) -> str:
    if result is EventResult.UNKNOWN_REQUEST:
        return (
            f"request {event.request_id!r} is unknown or has expired (impressions are kept "
            f"{retention_s:g} s)"
        )
    return f"item {event.item_id!r} was not shown in the answer to request {event.request_id!r}"


def _store_failed(exc: FeedbackStoreError, operation: str) -> Response:
    if isinstance(exc, FeedbackStoreBusy):
        # Not logged one by one: under a flood of clicks that would be a line per request.
        return error_response(
            503, f"the feedback store is busy: {exc}", headers={"Retry-After": "1"}
        )
    log.warning("feedback store failed: %s", exc)
    if _app().runtime.settings.metrics:
        metrics.observe_feedback_store_error(operation)
    return error_response(503, f"the feedback store is unavailable: {exc}")
