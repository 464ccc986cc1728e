"""The bodies `/recommendation` answers with, in the shapes of the response models.

- 200, `answer_body`: a `RecommendationResponse`, built as data and serialised by pydantic's
  own serialiser. What the gateway built itself is not validated again on every request (the
  tests hold the shape to the model, and the OpenAPI contract test to the document).
- 502, `unanswered_body`: no recommender answered; an `UnansweredRecommendation` built from
  the model (503 when the gateway's own overload cut their calls short: `unanswered_status`).
- 503, `ShedAnswer`: the worker has no room for the request; the same model, written once per
  admission limit, the request id spliced in, so that a shed request stays the cheapest answer
  there is.

Every body that reports the fan-out says in `COMPLETE_HEADER` whether every recommender
answered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pydantic_core

from gateway.contract.schemas import ErrorInfo, SourceReport, UnansweredRecommendation
from gateway.core.fusion import FusedRanking
from gateway.core.outcome import Outcome

__all__ = ["COMPLETE_HEADER", "ShedAnswer", "answer_body", "unanswered_body", "unanswered_status"]

COMPLETE_HEADER = "X-Fusion-Complete"

_UNANSWERED = "no recommender answered; see sources for each one's reason"
_UNANSWERED_OVERLOADED = (
    "gateway overloaded: no recommender answered in the time this worker could give the "
    "request; see sources for each one's reason"
)


def _source_reports(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """Each call's `SourceReport`, as JSON-ready data."""
    reports: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        report: dict[str, Any] = {"status": o.status, "latency_ms": o.latency_ms}
        report["attempts"] = o.attempts
        if o.error is not None:
            report["error"] = o.error
        reports[o.name] = report
    return reports


def answer_body(
    outcomes: Sequence[Outcome],
    answered: Sequence[Outcome],
    request_id: str,
    fused: FusedRanking,
    arm: str | None = None,
) -> bytes:
    """A `RecommendationResponse`: every answer in config order, and what became of each call."""
    body = {
        "result": [{"name": o.name, "prediction": o.prediction} for o in answered],
        "sources": _source_reports(outcomes),
        "complete": len(answered) == len(outcomes),
        "request_id": request_id,
        "fusion": fused.fusion,
        "fused": fused.items,
        "coverage": fused.coverage,
    }
    if arm is not None:
        body["arm"] = arm
    # A non-finite number in a recommender's answer becomes null, as the models would make it.
    return pydantic_core.to_json(body, inf_nan_mode="null")


def unanswered_status(outcomes: Sequence[Outcome]) -> int:
    """502 when no recommender answered; 503 when the gateway's own overload is why.

    A call that timed out for the gateway's overload (its loop stalled, or the request waited
    for admission until too little of the deadline was left) is not the recommender's failure:
    with no answer at all, the gateway is the one that failed, and says so with a 503.
    """
    return 503 if any(o.overload for o in outcomes) else 502


def unanswered_body(
    outcomes: Sequence[Outcome], request_id: str, trace_id: str | None, status: int = 502
) -> bytes:
    """The 502 (or 503) `UnansweredRecommendation`: nobody answered, and each one's reason."""
    message = _UNANSWERED if status == 502 else _UNANSWERED_OVERLOADED
    document = UnansweredRecommendation(
        error=ErrorInfo(status=status, message=message),
        request_id=request_id,
        trace_id=trace_id,
        result=[],
        sources={
            o.name: SourceReport(
                status=o.status, latency_ms=o.latency_ms, attempts=o.attempts, error=o.error
            )
            for o in outcomes
        },
        complete=False,
    )
    return document.model_dump_json(exclude_none=True).encode()


_SHED_REPORT = SourceReport(
    status="shed", latency_ms=0.0, attempts=0, error="not called: the gateway is shedding load"
)

Headers = list[tuple[bytes, bytes]]


class ShedAnswer:
    """The 503 of a request this worker has no room for: no recommender was called.

    Each is reported `shed`. The body is written from `UnansweredRecommendation` once per
    admission limit (the message names it), without the request id, which is spliced in.
    """

    def __init__(
        self,
        recommenders: Sequence[str],
        retry_after_s: int,
        queue_size: int = 0,
        deadline_ms: float = 1000,
    ):
        self.recommenders = tuple(recommenders)
        self.retry_after_s = retry_after_s
        self.queue_size = queue_size
        self.deadline_ms = deadline_ms
        self.headers = {"Retry-After": str(retry_after_s), COMPLETE_HEADER: "false"}
        self._raw_headers = [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        self._heads: dict[tuple[str, int], bytes] = {}

    def body(self, reason: str, limit: int, request_id: str) -> bytes:
        """The 503's body of a request shed for `reason` by a worker at admission limit `limit`."""
        head = self._heads.get((reason, limit))
        if head is None:
            head = self._heads[reason, limit] = self._head(reason, limit)
        return head + json.dumps(request_id).encode() + b"}"

    def render(self, reason: str, limit: int, request_id: str) -> tuple[bytes, Headers]:
        """The body and every header of the 503, as the ASGI server sends them."""
        body = self.body(reason, limit, request_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode("latin-1")),
            *self._raw_headers,
        ]
        return body, headers

    def _message(self, reason: str, limit: int) -> str:
        serving = f"this worker serves its limit of {limit} requests at once"
        retry = f"retry after {self.retry_after_s} s"
        if reason == "queue_full":
            return (
                f"gateway overloaded: {serving} and {self.queue_size} more wait for a slot "
                f"(its queue is full); {retry}"
            )
        if reason == "deadline":
            return (
                f"gateway overloaded: {serving}, and no slot came free in time to answer within "
                f"the deadline of {self.deadline_ms:g} ms; {retry}"
            )
        return (
            f"gateway overloaded: this worker already serves its limit of {limit} requests "
            f"at once; {retry}"
        )

    def _head(self, reason: str, limit: int) -> bytes:
        """The body up to where the request id goes: its last field."""
        document = UnansweredRecommendation(
            error=ErrorInfo(status=503, message=self._message(reason, limit)),
            result=[],
            sources=dict.fromkeys(self.recommenders, _SHED_REPORT),
            complete=False,
        )
        # Without a request id, exclude_none leaves it out; it goes last, as it always has.
        written = document.model_dump_json(exclude_none=True).encode()
        return written[:-1] + b',"request_id":'
