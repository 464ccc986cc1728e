"""Pydantic models of the `/recommendation` request and response."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import SourceStatus

__all__ = [
    "RecommendationRequest",
    "RecommendationResponse",
    "RecommenderResult",
    "SourceReport",
]


class RecommendationRequest(BaseModel):
    """What a frontend sends; fields beyond these are kept and forwarded as they came."""

    model_config = ConfigDict(extra="allow", strict=True)

    resultSize: int = Field(default=10, ge=1, le=100, description="Items wanted per recommender.")  # noqa: N815 - the wire name
    user_id: str | None = Field(default=None, max_length=256)
    context: dict[str, Any] | None = None

    def forwarded(self) -> dict[str, Any]:
        """The body sent to every recommender: defaults filled in, absent optionals left out."""
        absent = {"user_id", "context"} - self.model_fields_set
        return self.model_dump(mode="json", exclude=absent)


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


class RecommendationResponse(BaseModel):
    """The merged answer: every answer in config order, and what happened to each call."""

    result: list[RecommenderResult]
    sources: dict[str, SourceReport]
    complete: bool
    request_id: str
