"""The OpenAPI 3.1 document, generated from the same pydantic models that validate and shape.

pydantic writes JSON Schema 2020-12, which is what OpenAPI 3.1 uses, so the models' schemas go
into `components.schemas` as they are. The document is built once per app, from its settings
(whether API tokens are required shows in `security`).
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from gateway.config.settings import Settings
from gateway.contract.feedback_schemas import (
    ExperimentsReport,
    FeedbackBatch,
    FeedbackEventBody,
    FeedbackReceipt,
)
from gateway.contract.schemas import (
    ErrorDocument,
    RecommendationRequest,
    RecommendationResponse,
    UnansweredRecommendation,
)
from gateway.contract.security import TOKEN_HEADER
from gateway.core.request_id import REQUEST_ID_HEADER, REQUEST_ID_MAX

__all__ = ["build_spec"]

_REF = "#/components/schemas/{model}"


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=schema_name)}}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorDocument", description)


_REQUEST_ID = {
    "name": REQUEST_ID_HEADER,
    "in": "header",
    "required": False,
    "description": "Taken, or generated when absent; forwarded and echoed.",
    "schema": {"type": "string", "pattern": f"^[!-~]{{1,{REQUEST_ID_MAX}}}$"},
}

_ECHOED_ID = {REQUEST_ID_HEADER: {"schema": {"type": "string"}, "description": "The request's id."}}


def build_spec(settings: Settings, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway with `settings`."""
    _, definitions = models_json_schema(
        [
            (RecommendationRequest, "validation"),
            (RecommendationResponse, "serialization"),
            (ErrorDocument, "serialization"),
            (UnansweredRecommendation, "serialization"),
            (FeedbackEventBody, "validation"),
            (FeedbackBatch, "validation"),
            (FeedbackReceipt, "serialization"),
            (ExperimentsReport, "serialization"),
        ],
        ref_template=_REF,
    )
    schemas = definitions["$defs"]
    schemas["FeedbackBatch"]["properties"]["events"]["maxItems"] = settings.feedback.max_events
    recommendation: dict[str, Any] = {
        "summary": "Fan one request out to every recommender and merge the answers",
        "operationId": "recommend",
        "parameters": [_REQUEST_ID],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model="RecommendationRequest")}}
            },
        },
        "responses": {
            "200": _json("RecommendationResponse", "Every answer, in config order")
            | {"headers": _ECHOED_ID},
            "400": _error("The body is empty, not JSON, or not an object; a bad X-Request-ID"),
            "401": _error(f"API keys are configured and {TOKEN_HEADER} is missing or wrong"),
            "413": _error(f"The body is larger than {settings.max_body_bytes} bytes"),
            "422": _error("A field breaks the schema; `details` lists every field"),
            "500": _error("A gateway bug; the traceback is in its log under the request id"),
            "502": _json("UnansweredRecommendation", "No recommender answered"),
            "503": _json("UnansweredRecommendation", "Overloaded: shed, retry after a while"),
        },
    }
    if settings.api_keys:
        recommendation["security"] = [{"apiToken": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Fusion gateway",
            "version": version,
            "description": "One request, fanned out to every recommender, merged into one answer "
            "that says which recommenders answered.",
        },
        "paths": {
            "/recommendation": {"post": recommendation},
            "/feedback": {"post": _feedback(settings)},
            "/experiments": {"get": _experiments(settings)},
            "/healthz": {
                "get": {
                    "summary": "The process is up",
                    "operationId": "healthz",
                    "responses": {"200": {"description": "Up"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics, summed over the gateway's workers",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _error(
                            f"`metrics_require_token` is set and {TOKEN_HEADER} is wrong"
                        ),
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Config loaded and the recommender session open",
                    "operationId": "readyz",
                    "parameters": [
                        {
                            "name": "probe",
                            "in": "query",
                            "required": False,
                            "description": "`recommenders`: also ask each recommender's model "
                            "server whether it is ready, in its protocol",
                            "schema": {"type": "string", "enum": ["recommenders"]},
                        }
                    ],
                    "responses": {
                        "200": {"description": "Ready"},
                        "400": _error("An unknown probe"),
                        "503": _error("The session is not open, or a recommender is not ready"),
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiToken": {"type": "apiKey", "in": "header", "name": TOKEN_HEADER}
            },
        },
    }


_FEEDBACK_OFF = "Feedback is off (no `feedback.store`)"


def _feedback(settings: Settings) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": "Count users' events on the items an answer showed: one event, or a batch",
        "operationId": "feedback",
        "parameters": [_REQUEST_ID],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": _REF.format(model="FeedbackEventBody")},
                            {"$ref": _REF.format(model="FeedbackBatch")},
                        ]
                    }
                }
            },
        },
        "responses": {
            "202": _json(
                "FeedbackReceipt", "Counted; a batch lists the events it refused in `rejected`"
            ),
            "400": _error("The body is empty, not JSON, or not an object; a bad X-Request-ID"),
            "401": _error(f"API keys are configured and {TOKEN_HEADER} is missing or wrong"),
            "404": _error(
                f"{_FEEDBACK_OFF}; or the request id is unknown or expired (a batch: every "
                "event's, listed in `rejected`)"
            ),
            "413": _error(
                f"The body is larger than {settings.max_body_bytes} bytes, or a batch holds "
                f"more than {settings.feedback.max_events} events"
            ),
            "422": _error(
                "A field breaks the schema (`details`); or the answer did not show the item "
                "(a batch: none accepted, each refusal in `rejected`)"
            ),
            "500": _error("A gateway bug; the traceback is in its log under the request id"),
            "503": _error(
                "Nothing was counted, now or later: the store failed, or is busy (the events "
                "waited too long and were withdrawn, or too many wait); retry"
            ),
        },
    }
    if settings.api_keys:
        operation["security"] = [{"apiToken": []}]
    return operation


def _experiments(settings: Settings) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": "What feedback has counted: credit, pairwise preferences, arms, weights",
        "operationId": "experiments",
        "responses": {
            "200": _json("ExperimentsReport", "Every counter, over all that share the store"),
            "401": _error(f"API keys are configured and {TOKEN_HEADER} is missing or wrong"),
            "404": _error(_FEEDBACK_OFF),
            "503": _error("The feedback store failed"),
        },
    }
    if settings.api_keys:
        operation["security"] = [{"apiToken": []}]
    return operation
