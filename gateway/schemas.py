"""Pydantic models of the `/recommendation` request and response."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from gateway.errors import SourceStatus
from gateway.fusion import FusionChoice

__all__ = [
    "ErrorDetail",
    "ErrorDocument",
    "ErrorInfo",
    "FusedItem",
    "FusedSource",
    "RecommendationRequest",
    "RecommendationResponse",
    "RecommenderResult",
    "SourceReport",
    "UnansweredRecommendation",
]


class RecommendationRequest(BaseModel):
    """What a frontend sends; fields beyond these are kept and forwarded as they came."""

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra={
            "examples": [{"user_id": "u1", "resultSize": 3, "context": {"page": "home"}}]
        },
    )

    resultSize: int = Field(default=10, ge=1, le=100, description="Items wanted per recommender.")  # noqa: N815 - the wire name
    user_id: str | None = Field(default=None, max_length=256)
    context: dict[str, Any] | None = None
    fusion: FusionChoice | None = Field(
        default=None, description="How to fuse the answers; default from the config."
    )
    fusionWindow: int | None = Field(  # noqa: N815 - the wire name, like resultSize
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


class FusedSource(BaseModel):
    """Where a fused item was: which recommender, at which rank (from 1), with which score."""

    name: str
    rank: int
    score: float | None


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


class ErrorDetail(BaseModel):
    """One field's problem, in a validation error."""

    field: str
    message: str


class ErrorInfo(BaseModel):
    """What went wrong."""

    status: int
    message: str
    details: list[ErrorDetail] | None = None


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


class UnansweredRecommendation(ErrorDocument):
    """A 502 (no recommender answered) or 503 (shed): the error, and every source's status."""

    result: list[RecommenderResult]
    sources: dict[str, SourceReport]
    complete: bool
