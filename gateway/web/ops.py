"""The operations endpoints: health, readiness, metrics, and the API's own documentation.

`/healthz` (the process is up), `/readyz` (config loaded, recommender session open),
`/metrics` (Prometheus), `/openapi.json` (the OpenAPI 3.1 document, `gateway.contract.openapi`) and
`/docs` (Swagger UI, its assets served by the gateway itself, so it works offline).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
from typing import TYPE_CHECKING, cast

from flask import Blueprint, Response, abort, current_app, request
from swagger_ui_bundle import swagger_ui_path
from werkzeug.security import safe_join

from gateway.observability import metrics
from gateway.recommenders import readiness
from gateway.web.http_errors import error_response

if TYPE_CHECKING:
    from gateway.web.flask_app import GatewayFlask

__all__ = ["blueprint"]

blueprint = Blueprint("ops", __name__)


def _app() -> GatewayFlask:
    return cast("GatewayFlask", current_app)


@blueprint.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return Response('{"status":"ok"}', mimetype="application/json")


@blueprint.get("/readyz")
async def readyz() -> Response:
    """Config loaded and the recommender session open: ready to serve.

    With `?probe=recommenders` (or `readiness.probe_recommenders`), each recommender's model
    server is asked too, in its protocol (`gateway.recommenders.readiness`): 503 naming those not
    ready.
    """
    runtime = _app().runtime
    if not runtime.started:
        return error_response(503, "recommender session is not open")
    settings = runtime.settings
    names = [r.name for r in settings.recommenders]
    asked = request.args.get("probe")
    if asked is not None and asked != "recommenders":
        return error_response(400, f"unknown probe {asked!r}; the one there is: recommenders")
    if asked is None and not settings.readiness.probe_recommenders:
        return Response(
            json.dumps({"status": "ready", "recommenders": names}), mimetype="application/json"
        )
    found = await runtime.readiness()
    probed = {r.name: r.as_dict() for r in found}
    not_ready = readiness.summary(found)
    if not_ready:
        return error_response(503, f"recommenders not ready: {not_ready}", recommenders=probed)
    return Response(
        json.dumps({"status": "ready", "recommenders": names, "probed": probed}),
        mimetype="application/json",
    )


@blueprint.get("/metrics")
def metrics_endpoint() -> Response:
    """Prometheus metrics, summed over this gateway's workers."""
    if not _app().runtime.settings.metrics:
        return error_response(404, "metrics are switched off (metrics: false)")
    return Response(metrics.render(), content_type=metrics.CONTENT_TYPE_LATEST)


@blueprint.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 document, built from the request and response models."""
    return Response(_app().openapi_document, mimetype="application/json")


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
