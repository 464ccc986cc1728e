"""The gateway's exceptions: what can go wrong, in the domain's words, with no web framework.

Exception tree::

    GatewayError
    ├── ConfigError                  settings that do not validate; stops start-up
    ├── ClientClosedError            a recommender client used after its session closed
    ├── RequestError                 the frontend's request is wrong (4xx)
    └── RecommenderError             one recommender failed; becomes a `sources` entry
        ├── RecommenderTimeout       no answer within the call's time budget
        ├── RecommenderUnavailable   refused, reset, or answered with an error status
        ├── BadRecommenderResponse   answered 2xx with a body that is not JSON, or too large
        └── CircuitOpen              not called: its circuit breaker is open

Library errors (the HTTP client's, pydantic's) are translated into these at one boundary each
(`gateway.recommenders.clients`; pydantic's through `validation_problems` in
`gateway.contract.schemas` and `gateway.config`), so nothing else sees them.

How an exception becomes an HTTP response (the one JSON error shape) is the web layer's
business: `gateway.web.http_errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.core.outcome import SourceStatus

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "BadRecommenderResponse",
    "CircuitOpen",
    "ClientClosedError",
    "ConfigError",
    "GatewayError",
    "RecommenderError",
    "RecommenderTimeout",
    "RecommenderUnavailable",
    "RequestError",
    "validation_problems",
    "validation_summary",
]


def validation_problems(exc: ValidationError, top_level: str = "") -> list[dict[str, str]]:
    """Each problem pydantic found: the field's dotted path (`top_level` if none) and message."""
    return [
        {
            "field": ".".join(str(part) for part in error["loc"]) or top_level,
            "message": error["msg"],
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]


def validation_summary(problems: list[dict[str, str]]) -> str:
    """The problems on one line: ``field: message; ...``."""
    return "; ".join(f"{problem['field']}: {problem['message']}" for problem in problems)


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The settings do not validate; the message names the field."""


class ClientClosedError(GatewayError):
    """A recommender client was used after its session was closed."""


class RequestError(GatewayError):
    """The frontend's request cannot be served as sent."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


class RecommenderError(GatewayError):
    """One recommender did not give a usable answer.

    `retryable` says whether the same call may be tried again (see `gateway.resilience.policies`);
    `retry_after_s` carries the recommender's `Retry-After`, if it sent one.
    """

    status: SourceStatus = "error"

    def __init__(
        self,
        recommender: str,
        reason: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{recommender}: {reason}")
        self.recommender = recommender
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class RecommenderTimeout(RecommenderError):
    """The recommender did not answer within its time budget."""

    status: SourceStatus = "timeout"


class RecommenderUnavailable(RecommenderError):
    """The recommender refused or dropped the connection, or answered an error status."""


class BadRecommenderResponse(RecommenderError):
    """The recommender answered a body that is not JSON, or beyond the gateway's limits."""


class CircuitOpen(RecommenderError):
    """The recommender was not called: its circuit breaker is open."""

    status: SourceStatus = "circuit_open"
