"""The gateway's HTTP endpoints: `/recommendation`, `/healthz`, `/readyz`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import time
from typing import Any

import pydantic_core
from flask import Blueprint, Response, abort, current_app, g, request
from pydantic import ValidationError
from swagger_ui_bundle import swagger_ui_path
from werkzeug.security import safe_join

from gateway import metrics
from gateway.errors import (
    RequestError,
    error_body,
    error_response,
    validation_problems,
    validation_summary,
)
from gateway.fusion import coverage, ranked_from
from gateway.logs import log_request
from gateway.outcome import Deadline, Outcome
from gateway.request_id import (
    REQUEST_ID_HEADER,
    REQUEST_ID_MAX,
    new_request_id,
    valid_request_id,
)
from gateway.runtime import WorkerRuntime
from gateway.schemas import (
    RecommendationRequest,
    parse_request_json,
)
from gateway.security import TOKEN_HEADER, TokenCheck
from gateway.tracing import RequestSpan

__all__ = ["ADMITTED", "COMPLETE_HEADER", "blueprint", "shed_answer"]

COMPLETE_HEADER = "X-Fusion-Complete"
# Set in the WSGI environ of a request admitted before Flask (`gateway.serving`).
ADMITTED = "gateway.admitted"

blueprint = Blueprint("gateway", __name__)


def _runtime() -> WorkerRuntime:
    runtime: WorkerRuntime = current_app.extensions["gateway"]
    return runtime


@blueprint.before_app_request
def _assign_request_id() -> None:
    g.received_at = time.perf_counter()
    supplied = request.headers.get(REQUEST_ID_HEADER)
    if supplied is not None and valid_request_id(supplied):
        g.request_id = supplied
        return
    g.request_id = new_request_id()
    if supplied is not None:
        raise RequestError(
            400,
            f"header {REQUEST_ID_HEADER} must be 1 to {REQUEST_ID_MAX} visible ASCII characters",
        )


# Endpoints that need a token when API keys are configured.
_PROTECTED = frozenset({"gateway.recommendation"})


@blueprint.before_request
def _require_token() -> Response | None:
    """401 for a protected endpoint without a valid `X-Api-Token`, when keys are configured."""
    tokens: TokenCheck = current_app.extensions["gateway.tokens"]
    protected = request.endpoint in _PROTECTED or (
        request.endpoint == "gateway.metrics_endpoint" and _runtime().settings.metrics_require_token
    )
    if not tokens.enabled or not protected:
        return None
    token = request.headers.get(TOKEN_HEADER)
    challenge = {"WWW-Authenticate": f'ApiKey header="{TOKEN_HEADER}"'}
    if token is None:
        return error_response(401, f"missing {TOKEN_HEADER} header", headers=challenge)
    if not tokens.allows(token):
        return error_response(401, f"invalid API token in {TOKEN_HEADER}", headers=challenge)
    return None


def shed_answer(
    runtime: WorkerRuntime, request_id: str, limit: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a 503 for a request this worker has no room for.

    No recommender was called: each is reported `shed`. `limit`: the admission limit it met
    (default: the limit now).
    """
    settings = runtime.settings
    limit = runtime.admission.limit if limit is None else limit
    retry_after = settings.shed_retry_after_s
    body = {
        "error": {
            "status": 503,
            "message": f"gateway overloaded: this worker already serves its limit of "
            f"{limit} requests at once; retry after {retry_after} s",
        },
        "result": [],
        "sources": _shed_sources(runtime),
        "complete": False,
        "request_id": request_id,
    }
    headers = {"Retry-After": str(retry_after), COMPLETE_HEADER: "false"}
    return pydantic_core.to_json(body), headers


_SHED = {
    "status": "shed",
    "latency_ms": 0.0,
    "attempts": 0,
    "error": "not called: the gateway is shedding load",
}


def _shed_sources(runtime: WorkerRuntime) -> dict[str, dict[str, Any]]:
    return {r.name: _SHED for r in runtime.settings.recommenders}


@blueprint.before_request
def _shed_when_full() -> Response | None:
    """Answer 503 at once when this worker already serves its limit of requests.

    Under the uvicorn worker, `gateway.serving` admits (or sheds) before Flask runs.
    """
    if request.endpoint != "gateway.recommendation" or request.environ.get(ADMITTED):
        return None
    runtime = _runtime()
    if runtime.admission.try_enter():
        g.admitted = True
        return None
    runtime.shed += 1
    g.shed = True
    body, headers = shed_answer(runtime, g.request_id)
    return Response(body, status=503, headers=headers, mimetype="application/json")


@blueprint.teardown_request
def _leave(error: BaseException | None) -> None:
    if g.pop("admitted", False):
        _runtime().admission.leave(time.perf_counter() - g.received_at)


@blueprint.after_app_request
def _finish_response(response: Response) -> Response:
    """Echo the request id, log the request, and count it in the metrics."""
    request_id = g.get("request_id")
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    settings = _runtime().settings
    log_request(response, settings.log_requests)
    if settings.metrics:
        route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        elapsed = time.perf_counter() - g.received_at
        if g.get("shed"):
            metrics.observe_shed(route, elapsed)
        else:
            metrics.observe_request(route, response.status_code, elapsed)
    return response


def _parse_request(raw: bytes) -> RecommendationRequest:
    """Validate the frontend's body; raise `RequestError` (400 or 422) naming the problem."""
    if not raw.strip():
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        body = parse_request_json(raw, _runtime().settings.max_json_depth)
    except ValueError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(body), "a number"
        )
        raise RequestError(400, f"request body must be a JSON object, not {kind}")
    try:
        return RecommendationRequest.model_validate(body)
    except ValidationError as exc:
        details = validation_problems(exc)
        raise RequestError(422, f"invalid request: {validation_summary(details)}", details) from exc


def _fuse(
    outcomes: list[Outcome], recommendation: RecommendationRequest, runtime: WorkerRuntime
) -> tuple[str, list[dict[str, Any]], float]:
    """The fusion used, its top `resultSize` items, and the coverage of those that answered."""
    weights = runtime.weights
    name = recommendation.fusion or runtime.settings.fusion
    # A weight of 0 is shadow mode: the answer is returned in `result` but not fused.
    fusing = [o for o in outcomes if o.ok and weights[o.name] > 0]
    covered = coverage(fusing, weights)
    if name == "none":
        return name, [], covered
    lists = [ranked_from(o.name, weights[o.name], o.prediction) for o in fusing]
    fused = runtime.fusions[name].fuse(lists, recommendation.resultSize, g.request_id)
    items = [
        {
            "id": item.id,
            "score": item.score,
            "sources": [
                {"name": p.name, "rank": p.rank, "score": p.score}
                if p.score is not None
                else {"name": p.name, "rank": p.rank}
                for p in item.sources
            ],
        }
        for item in fused
    ]
    return name, items, covered


def _source_reports(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Each call's `SourceReport`, as JSON-ready data."""
    reports: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        report: dict[str, Any] = {"status": o.status, "latency_ms": o.latency_ms}
        report["attempts"] = o.attempts
        if o.error is not None:
            report["error"] = o.error
        reports[o.name] = report
    return reports


def _respond(
    outcomes: list[Outcome],
    recommendation: RecommendationRequest,
    runtime: WorkerRuntime,
    span: RequestSpan,
) -> Response:
    """The merged answer: a `RecommendationResponse`, or a 502 when nobody answered.

    The body is built as data in the shape of the response model, and serialised by pydantic's
    own serialiser: what the gateway built itself is not validated again on every request
    (the tests hold the shape to the model, and the OpenAPI contract test to the document).
    """
    answered = [o for o in outcomes if o.ok]
    complete = len(answered) == len(outcomes)
    result = [{"name": o.name, "prediction": o.prediction} for o in answered]
    fusion: str | None = None
    covered: float | None = None
    if answered:
        fusion, fused, covered = _fuse(outcomes, recommendation, runtime)
        status = 200
        body: dict[str, Any] = {
            "result": result,
            "sources": _source_reports(outcomes),
            "complete": complete,
            "request_id": g.request_id,
            "fusion": fusion,
            "fused": fused,
            "coverage": covered,
        }
    else:
        status = 502
        body = error_body(502, "no recommender answered; see sources for each one's reason")
        body.update(result=result, sources=_source_reports(outcomes), complete=complete)
    # A non-finite number in a recommender's answer becomes null, as the models would make it.
    payload = pydantic_core.to_json(body, inf_nan_mode="null")
    response = Response(payload, status=status, mimetype="application/json")
    response.headers[COMPLETE_HEADER] = "true" if complete else "false"
    span.answered(status, complete, covered, fusion)
    return response


@blueprint.post("/recommendation")
async def recommendation() -> Response:
    """Fan the request out to every recommender and merge what comes back."""
    runtime = _runtime()
    # The frontend's trace continued (W3C traceparent); the calls' spans are its children.
    with runtime.tracing.request(request.headers, g.request_id) as span:
        g.trace_id = span.trace_id
        recommendation = _parse_request(request.get_data())
        forwarded = recommendation.forwarded(runtime.settings.fusion_window)
        body = json.dumps(forwarded, separators=(",", ":")).encode()
        deadline = Deadline.after(runtime.settings.deadline_ms, start=g.received_at)
        headers = {REQUEST_ID_HEADER: g.request_id}
        outcomes = await runtime.fan_out.fan_out(body, headers, deadline)
        g.outcomes = outcomes
        if runtime.settings.metrics:
            metrics.observe_outcomes(
                outcomes, {name: guard.breaker.state for name, guard in runtime.guards.items()}
            )
        return _respond(outcomes, recommendation, runtime, span)


@blueprint.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 document, built from the request and response models."""
    spec: str = current_app.extensions["gateway.openapi"]
    return Response(spec, mimetype="application/json")


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Fusion gateway API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


@blueprint.get("/docs")
def docs() -> Response:
    """Swagger UI, its assets served by the gateway itself (works offline)."""
    return Response(_DOCS_PAGE, mimetype="text/html")


# Swagger UI's files as read once, so that no later request reads the disk on the serving loop.
_ASSETS: dict[str, tuple[bytes, str]] = {}


def _read_asset(asset: str) -> bytes | None:
    path = safe_join(swagger_ui_path, asset)
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as file:
        return file.read()


@blueprint.get("/docs/<path:asset>")
async def docs_asset(asset: str) -> Response:
    """Swagger UI's JavaScript and CSS, from the installed swagger-ui-bundle package."""
    cached = _ASSETS.get(asset)
    if cached is None:
        content = await asyncio.to_thread(_read_asset, asset)
        if content is None:
            abort(404)
        mimetype = mimetypes.guess_type(asset)[0] or "application/octet-stream"
        cached = _ASSETS[asset] = (content, mimetype)
    response = Response(cached[0], mimetype=cached[1])
    response.cache_control.public = True
    response.cache_control.max_age = 86400
    return response


@blueprint.get("/metrics")
def metrics_endpoint() -> Response:
    """Prometheus metrics, summed over this gateway's workers."""
    if not _runtime().settings.metrics:
        return error_response(404, "metrics are switched off (metrics: false)")
    return Response(metrics.render(), content_type=metrics.CONTENT_TYPE_LATEST)


@blueprint.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return Response('{"status":"ok"}', mimetype="application/json")


@blueprint.get("/readyz")
def readyz() -> Response:
    """Config loaded and the recommender session open: ready to serve."""
    runtime = _runtime()
    with contextlib.suppress(RuntimeError):
        runtime.start()
    if not runtime.started:
        return error_response(503, "recommender session is not open")
    names = [r.name for r in runtime.settings.recommenders]
    return Response(
        json.dumps({"status": "ready", "recommenders": names}), mimetype="application/json"
    )
