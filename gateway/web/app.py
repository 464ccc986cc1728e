"""`create_app`: the gateway's Flask app, built from the settings.

The app (`gateway.web.flask_app.GatewayFlask`) with its runtime, API tokens, fuser, shed answer
and OpenAPI document, the hooks, the blueprints and the error handlers. gunicorn serves it as
`gateway.asgi:app` (on the uvicorn worker's event loop) or `gateway.wsgi:app`.
"""

from __future__ import annotations

import atexit
import json
from typing import Any

from gateway.config.settings import Settings, load_settings
from gateway.contract.answers import ShedAnswer
from gateway.contract.openapi import build_spec
from gateway.contract.security import TokenCheck
from gateway.core.fusion import Fuser
from gateway.observability.tracing import check_installed
from gateway.runtime.worker_runtime import WorkerRuntime, package_version
from gateway.web import feedback_routes, ops, routes
from gateway.web.flask_app import VIEW_GRACE_S, GatewayFlask
from gateway.web.hooks import register_hooks
from gateway.web.http_errors import register_error_handlers

__all__ = ["VIEW_GRACE_S", "GatewayFlask", "create_app"]


def create_app(settings: Settings | None = None, span_processor: Any = None) -> GatewayFlask:
    """Build the gateway app from `settings` (default: `load_settings()`).

    `span_processor`: an OpenTelemetry `SpanProcessor` that takes the spans instead of the
    OTLP exporter's batches, when tracing is on (tests give an in-memory exporter's).
    """
    settings = settings if settings is not None else load_settings()
    check_installed(settings.tracing)  # at start-up, not at the first request
    app = GatewayFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # error bodies read status, message, details
    runtime = WorkerRuntime(settings, span_processor)
    app.runtime = runtime
    app.tokens = TokenCheck(settings.api_keys)
    app.fuser = Fuser(settings.fusion_weights, settings.fusion, settings.rrf_k)
    names = [r.name for r in settings.recommenders]
    app.shed_answer = ShedAnswer(
        names,
        settings.shed_retry_after_s,
        queue_size=settings.admission.queue_size,
        deadline_ms=settings.deadline_ms,
    )
    app.openapi_document = json.dumps(build_spec(settings, package_version()))
    register_hooks(app)
    app.register_blueprint(routes.blueprint)
    app.register_blueprint(feedback_routes.blueprint)
    app.register_blueprint(ops.blueprint)
    register_error_handlers(app)
    atexit.register(runtime.close)
    return app
