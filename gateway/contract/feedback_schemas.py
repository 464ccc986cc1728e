"""Pydantic models of `POST /feedback` and `GET /experiments`, and the feedback body's parse.

`parse_feedback` turns a body, one event or ``{"events": [...]}``, into `FeedbackEvent`s, or a
`RequestError` naming the problem (400 not JSON, 413 too many events, 422 a field). The
response models describe the bodies for the OpenAPI document and the tests; the bodies are
written by `gateway.web.feedback_routes` (the receipt) and `gateway.feedback.service` (the report).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.contract.schemas import RejectedEvent
from gateway.core.errors import RequestError, validation_problems, validation_summary
from gateway.core.jsonlimits import JsonRefused, loads_request
from gateway.core.request_id import REQUEST_ID_MAX
from gateway.feedback.impressions import EventKind, FeedbackEvent

__all__ = [
    "ArmReport",
    "ExperimentsReport",
    "FeedbackBatch",
    "FeedbackEventBody",
    "FeedbackReceipt",
    "PairwisePreference",
    "ParsedFeedback",
    "RecommenderFeedback",
    "WeightsReport",
    "parse_feedback",
]

_Forbid = ConfigDict(extra="forbid", strict=True)
_Model = TypeVar("_Model", bound=BaseModel)


def implicit_event_id(event: FeedbackEventBody) -> str:
    """The identity of an event sent without `event_id`: its kind and item, within its request.

    A client that retries a click it got no answer for, or a 5xx, counts it once without
    naming it; a user who clicks the same item of the same answer twice counts one click.
    """
    return f"implicit:{event.event}:{event.item_id}"


class FeedbackEventBody(BaseModel):
    """A user's event on an item of a `/recommendation` answer."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"request_id": "3f2a9c", "item_id": "i7", "event": "click", "event_id": "e-1"}
            ]
        },
    )

    request_id: str = Field(
        min_length=1,
        max_length=REQUEST_ID_MAX,
        description="The answer's `request_id` (its X-Request-ID).",
    )
    item_id: str = Field(
        min_length=1, max_length=256, description="The item's `id` in the answer's `fused`."
    )
    event: EventKind = Field(description="`click` and `purchase` credit; `dismiss` is counted.")
    event_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Makes a retry count once: an id already accepted for this request is a "
        "duplicate. Without it, the event is known by its request, item and kind: a second "
        "`click` on the same item of the same answer is a duplicate.",
    )

    def to_event(self) -> FeedbackEvent:
        """As the feedback store takes it: with its own `event_id`, else one made of what it is."""
        event_id = self.event_id if self.event_id is not None else implicit_event_id(self)
        return FeedbackEvent(self.request_id, self.item_id, self.event, event_id)


class FeedbackBatch(BaseModel):
    """Several events at once, judged in order."""

    model_config = _Forbid

    events: list[FeedbackEventBody] = Field(
        min_length=1, description="1 to `feedback.max_events` events."
    )


class FeedbackReceipt(BaseModel):
    """What became of the events: counted, already counted, and (a batch) the refused."""

    accepted: int = Field(description="Events counted now.")
    duplicates: int = Field(description="Events whose `event_id` was counted before.")
    rejected: list[RejectedEvent] | None = Field(
        default=None, description="A batch's refused events, when others were accepted."
    )


class RecommenderFeedback(BaseModel):
    """One recommender's feedback so far."""

    impressions: int = Field(description="Answers that showed one of its items.")
    clicks: int = Field(description="Positive events (click, purchase) credited to it.")
    credit: float = Field(ge=0, le=1, description="Its share of all credit given.")
    weight: float | None = Field(description="Its fusion weight in use (learnt or configured).")


class PairwisePreference(BaseModel):
    """Interleaving comparisons between recommenders a and b, from a's side."""

    a: str
    b: str
    wins: int
    losses: int
    ties: int
    preference: float = Field(description="The share of decided comparisons a won.")
    low: float = Field(description="95% Wilson interval of `preference`, low end.")
    high: float = Field(description="95% Wilson interval of `preference`, high end.")


class ArmReport(BaseModel):
    """One experiment arm: its answers, and how many of them drew a positive event."""

    fusion: str | None = Field(description="Its fusion; null for an arm no longer configured.")
    explore: bool = Field(description="An exploration arm: its share falls as evidence comes.")
    share_now: float = Field(description="Its share of the users now (the arms' sum to 1).")
    impressions: int
    clicked_impressions: int
    clicks: int
    ctr: float = Field(description="clicked_impressions / impressions.")
    low: float = Field(description="95% Wilson interval of `ctr`, low end.")
    high: float = Field(description="95% Wilson interval of `ctr`, high end.")


class WeightsReport(BaseModel):
    """The learnt fusion weights and the evidence behind them."""

    in_use: dict[str, float] = Field(description="What `weights: learned` arms fuse with.")
    learning: bool = Field(description="Whether the learner runs (`feedback.learner.enabled`).")
    frozen: bool = Field(description="Whether the weights are held (`feedback.learner.frozen`).")
    evidence: int = Field(description="Pairwise comparisons between learnt recommenders so far.")
    version: int = Field(description="Version of the learnt weights in use; 0 before any move.")
    updated_at: float | None = Field(description="When they were learnt (unix seconds).")
    initial: dict[str, float] = Field(description="The weights learning starts from (the prior).")
    prior: PriorReport


class Agreement(BaseModel):
    """Comparisons won by the recommender the start weighs more (`agree`) or less (`disagree`)."""

    agree: int = Field(ge=0)
    disagree: int = Field(ge=0)


class PriorReport(BaseModel):
    """Where learning starts, and how much evidence it takes to move from there."""

    from_: Literal["start_weights", "recommenders", "none"] = Field(
        alias="from",
        description="`start_weights`: `feedback.learner.start_weights`; `recommenders`: their "
        "configured weights, which differ; `none`: equal ones, no prior "
        "(`feedback.learner.cold_start` says what is served until `min_evidence`).",
    )
    strength: float = Field(
        description="The comparisons the start is worth now: `feedback.learner.start_strength` "
        "for a prior the evidence has not contradicted, else `feedback.learner.prior`."
    )
    agreement: Agreement = Field(
        description="The decided comparisons that agree and disagree with the start's order."
    )
    contradicted: bool = Field(
        description="More of them disagree than agree, 95% sure: the start is then worth "
        "`feedback.learner.prior` only, and the evidence leads."
    )


class ServedReport(BaseModel):
    """Every arm's answers together: what users were served, and how many drew a click."""

    impressions: int
    clicked_impressions: int
    ctr: float = Field(description="clicked_impressions / impressions, over every arm.")
    low: float = Field(description="95% Wilson interval of `ctr`, low end.")
    high: float = Field(description="95% Wilson interval of `ctr`, high end.")


class ExplorationReport(BaseModel):
    """What interleaving for evidence costs now, and why."""

    share_now: float = Field(description="The exploring arms' share of the users now.")
    uncertainty: float = Field(
        description="The widest 95% half-width among the learnt recommenders' shares of their "
        "decided comparisons (0.5: one not yet compared); exploring arms get `share` times "
        "(uncertainty / 0.5)², at least `min_share`."
    )


class ExperimentsReport(BaseModel):
    """Everything feedback has counted, over every worker and instance sharing the store."""

    recommenders: dict[str, RecommenderFeedback]
    pairwise: list[PairwisePreference]
    arms: dict[str, ArmReport]
    served: ServedReport
    exploration: ExplorationReport
    weights: WeightsReport
    events: dict[str, int] = Field(description="Accepted events by kind.")
    impressions_stored: int = Field(description="Impressions not yet expired.")


class ParsedFeedback(NamedTuple):
    """The events of a `/feedback` body, and whether it was a batch."""

    events: list[FeedbackEvent]
    batch: bool


def parse_feedback(raw: bytes, max_depth: int, max_events: int) -> ParsedFeedback:
    """Validate a `/feedback` body; raise `RequestError` (400, 413 or 422) naming the problem."""
    if not raw.strip():
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        body = loads_request(raw, max_depth)
    except JsonRefused as exc:
        raise _invalid([{"field": exc.field or "(body)", "message": str(exc)}]) from None
    except ValueError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object: one event, or {events}")
    if "events" not in body:
        return ParsedFeedback([_validated(FeedbackEventBody, body).to_event()], batch=False)
    events = body["events"]
    if isinstance(events, list) and len(events) > max_events:
        raise RequestError(
            413,
            f"a feedback batch holds at most {max_events} events (feedback.max_events); "
            f"this one has {len(events)}: send it in parts",
        )
    batch = _validated(FeedbackBatch, body)
    return ParsedFeedback([event.to_event() for event in batch.events], batch=True)


def _validated(model: type[_Model], body: dict[str, Any]) -> _Model:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(validation_problems(exc)) from exc


def _invalid(details: list[dict[str, str]]) -> RequestError:
    return RequestError(422, f"invalid feedback: {validation_summary(details)}", details)
