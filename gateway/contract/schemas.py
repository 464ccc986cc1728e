"""Pydantic models of the `/recommendation` request and response, and the request's validation.

`parse_request` turns a frontend's body into a `RecommendationRequest`, or a `RequestError`
(400 or 422) naming the problem; the strict JSON parsing underneath is `gateway.core.jsonlimits`'.
The response models describe the bodies for the OpenAPI document and the tests; the bodies
themselves are written by `gateway.contract.answers`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from gateway.core.errors import RequestError, validation_problems, validation_summary
from gateway.core.fusion import FusionChoice
from gateway.core.jsonlimits import JsonRefused, loads_request
from gateway.core.outcome import SourceStatus

__all__ = [
    "MAX_UNKNOWN_FIELDS",
    "MAX_UNKNOWN_FIELDS_BYTES",
    "ErrorDetail",
    "ErrorDocument",
    "ErrorInfo",
    "FusedItem",
    "FusedSource",
    "RecommendationRequest",
    "RecommendationResponse",
    "RecommenderResult",
    "RejectedEvent",
    "SourceReport",
    "UnansweredRecommendation",
    "parse_request",
]

# Fields beyond the known ones are forwarded to every recommender: a body may carry this many,
# of at most this many bytes together (as forwarded, in compact JSON).
MAX_UNKNOWN_FIELDS = 32
MAX_UNKNOWN_FIELDS_BYTES = 16 * 1024


class RecommendationRequest(BaseModel):
    """What a frontend sends; fields beyond these are kept and forwarded as they came."""

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra={
            "examples": [{"user_id": "u1", "resultSize": 3, "context": {"page": "home"}}]
        },
    )

    # camelCase, resultSize and fusionWindow: the wire names
    resultSize: int = Field(default=10, ge=1, le=100, description="Items wanted per recommender.")
    user_id: str | None = Field(default=None, max_length=256)
    context: dict[str, Any] | None = None
    fusion: FusionChoice | None = Field(
        default=None, description="How to fuse the answers; default from the config."
    )
    fusionWindow: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Fuse from each recommender's top N (asking for at least N items); "
        "default from the config's fusion_window, else resultSize.",
    )

    @field_validator("resultSize", "fusionWindow", mode="before")
    @classmethod
    def _integral_number(cls, value: Any) -> Any:
        # JSON has one number type: 36.0 is the integer 36 (as JSON Schema says); strings,
        # booleans and 36.5 are still refused by the strict check that follows.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    def forwarded(self, window: int | None = None) -> dict[str, Any]:
        """The body sent to every recommender: defaults filled in, absent optionals left out.

        With a fusion window above `resultSize` (the request's `fusionWindow`, else `window`
        from the config), recommenders are asked for that many items, so that fusion can draw
        on more than each one's top `resultSize`.
        """
        # `fusion` and `fusionWindow` are the gateway's own business, not the recommenders'.
        absent = ({"user_id", "context"} - self.model_fields_set) | {"fusion", "fusionWindow"}
        if self.fusionWindow is not None:
            window = self.fusionWindow
        body = self.model_dump(mode="json", exclude=absent)
        if window is not None and window > self.resultSize:
            body["resultSize"] = window
        return body


def parse_request(raw: bytes, max_depth: int) -> RecommendationRequest:
    """Validate the frontend's body; raise `RequestError` (400 or 422) naming the problem.

    400 when it is empty, not JSON, or not an object; 422 naming the field when it nests
    deeper than `max_depth`, holds a number beyond the limits (`gateway.core.jsonlimits`), brings
    more unknown fields, or more of them, than the recommenders are sent, or breaks the model.
    """
    if not raw.strip():
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        body = loads_request(raw, max_depth)
    except JsonRefused as exc:
        raise _invalid(exc.field or "(body)", str(exc)) from None
    except ValueError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(body), "a number"
        )
        raise RequestError(400, f"request body must be a JSON object, not {kind}")
    if not body.keys() <= _KNOWN_FIELDS:
        _check_unknown_fields(body)
    try:
        return RecommendationRequest.model_validate(body)
    except ValidationError as exc:
        details = validation_problems(exc)
        raise RequestError(422, f"invalid request: {validation_summary(details)}", details) from exc


_KNOWN_FIELDS = frozenset(RecommendationRequest.model_fields)


def _check_unknown_fields(body: dict[str, Any]) -> None:
    unknown = [name for name in body if name not in _KNOWN_FIELDS]
    if len(unknown) > MAX_UNKNOWN_FIELDS:
        raise _invalid(
            unknown[MAX_UNKNOWN_FIELDS],
            f"one of {len(unknown)} unknown fields; at most {MAX_UNKNOWN_FIELDS} are forwarded",
        )
    size = 0
    for name in unknown:
        size += len(json.dumps({name: body[name]}, separators=(",", ":")))
        if size > MAX_UNKNOWN_FIELDS_BYTES:
            raise _invalid(
                name,
                f"unknown fields of more than {MAX_UNKNOWN_FIELDS_BYTES} bytes together; "
                "that much at most is forwarded",
            )


def _invalid(field: str, message: str) -> RequestError:
    details = [{"field": field, "message": message}]
    return RequestError(422, f"invalid request: {field}: {message}", details)


class RecommenderResult(BaseModel):
    """One recommender's answer, its JSON body as it came."""

    name: str
    prediction: Any


class SourceReport(BaseModel):
    """What happened to the call to one recommender."""

    status: SourceStatus
    latency_ms: float
    attempts: int = Field(description="Calls made: 0 when none was (circuit open, no time left).")
    error: str | None = None


_SOURCES_EXAMPLE: dict[str, JsonValue] = {
    "sml": {"status": "ok", "latency_ms": 21.4, "attempts": 1},
    "trd": {
        "status": "timeout",
        "latency_ms": 250.3,
        "attempts": 1,
        "error": "no answer within 250 ms",
    },
}


# `gateway.core.fusion.Provenance` as sent (the docstring is the OpenAPI document's description).
class FusedSource(BaseModel):
    """Where a fused item was: which recommender, at which rank (from 1), with which score."""

    name: str
    rank: int
    score: float | None


# `gateway.core.fusion.Scored` as sent.
class FusedItem(BaseModel):
    """One item of the fused ranking."""

    id: str
    score: float
    sources: list[FusedSource]


class RecommendationResponse(BaseModel):
    """The merged answer: every answer in config order, and what happened to each call."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "result": [
                        {"name": "sml", "prediction": {"items": [{"id": "i7", "score": 0.93}]}}
                    ],
                    "sources": _SOURCES_EXAMPLE,
                    "complete": False,
                    "request_id": "3f2a9c",
                    "fusion": "rrf",
                    "fused": [
                        {
                            "id": "i7",
                            "score": 0.016393,
                            "sources": [{"name": "sml", "rank": 1, "score": 0.93}],
                        }
                    ],
                    "coverage": 0.5,
                    "arm": "control",
                }
            ]
        }
    )

    result: list[RecommenderResult]
    sources: dict[str, SourceReport]
    complete: bool
    request_id: str
    fusion: str = Field(description="The fusion strategy used for `fused`.")
    fused: list[FusedItem] = Field(description="The top `resultSize` items of the fused ranking.")
    coverage: float = Field(description="Summed weight of those that answered, over the total.")
    arm: str | None = Field(
        default=None,
        description="The experiment arm (`feedback.experiments.arms`) that chose the fusion for "
        "this user; absent when feedback or the experiment is off, the request named its "
        "own `fusion`, or it had no `user_id`.",
    )


class ErrorDetail(BaseModel):
    """One field's problem, in a validation error."""

    field: str
    message: str


class RejectedEvent(BaseModel):
    """One feedback event of a batch that was refused: its index, status and why."""

    index: int = Field(description="Its position in `events`, from 0.")
    status: int = Field(description="404: unknown or expired request id; 422: item not shown.")
    message: str


class ErrorInfo(BaseModel):
    """What went wrong."""

    status: int
    message: str
    details: list[ErrorDetail] | None = None
    rejected: list[RejectedEvent] | None = Field(
        default=None, description="`POST /feedback` with none accepted: each event's refusal."
    )


class ErrorDocument(BaseModel):
    """The body of every 4xx and 5xx."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "status": 422,
                        "message": "invalid request: resultSize: Input should be less than "
                        "or equal to 100",
                        "details": [
                            {
                                "field": "resultSize",
                                "message": "Input should be less than or equal to 100",
                            }
                        ],
                    },
                    "request_id": "3f2a9c",
                }
            ]
        }
    )

    error: ErrorInfo
    request_id: str | None = None
    trace_id: str | None = Field(
        default=None, description="The request's trace (32 hex digits), when it is traced."
    )


class UnansweredRecommendation(ErrorDocument):
    """A 502 (no recommender answered) or 503 (shed): the error, and every source's status."""

    result: list[RecommenderResult]
    sources: dict[str, SourceReport]
    complete: bool
