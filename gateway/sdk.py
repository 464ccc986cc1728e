"""A small client for the gateway: `recommend` (sync), `recommend_async`, `send_feedback`
(sync), `send_feedback_async`, and a command line.

    >>> from gateway.sdk import FeedbackEventBody, recommend, send_feedback
    >>> answer = recommend("http://127.0.0.1:5000", user_id="u1", result_size=3)
    >>> [entry.name for entry in answer.result], answer.complete
    >>> click = FeedbackEventBody(request_id=answer.request_id, item_id=answer.fused[0].id,
    ...                           event="click", event_id="e-1")
    >>> send_feedback("http://127.0.0.1:5000", [click]).accepted

Command line: ``python -m gateway.sdk --url http://127.0.0.1:5000 --user u1`` prints the
response; it exits 0 on 200, 1 on an error status (printed to stderr), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp
import requests

from gateway.contract.feedback_schemas import FeedbackEventBody, FeedbackReceipt
from gateway.contract.schemas import RecommendationResponse
from gateway.contract.security import TOKEN_HEADER
from gateway.core.request_id import REQUEST_ID_HEADER

__all__ = [
    "FeedbackEventBody",
    "FeedbackReceipt",
    "GatewayHTTPError",
    "main",
    "recommend",
    "recommend_async",
    "send_feedback",
    "send_feedback_async",
]


class GatewayHTTPError(Exception):
    """The gateway answered an error status; `body` is its JSON error document."""

    def __init__(self, status: int, body: Any):
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status}: {message or body}")
        self.status = status
        self.body = body


def _request(
    user_id: str | None, result_size: int | None, context: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if user_id is not None:
        body["user_id"] = user_id
    if result_size is not None:
        body["resultSize"] = result_size
    if context is not None:
        body["context"] = context
    return body


def _feedback(events: Sequence[FeedbackEventBody]) -> dict[str, Any]:
    if not events:
        raise ValueError("send_feedback needs at least one event")
    dumped = [event.model_dump(exclude_none=True) for event in events]
    return dumped[0] if len(dumped) == 1 else {"events": dumped}


def _headers(token: str | None, request_id: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers[TOKEN_HEADER] = token
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return headers


def _document(status: int, text: str, expected: int) -> Any:
    """The JSON body of an `expected` answer; `GatewayHTTPError` for any other status."""
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    if status != expected:
        raise GatewayHTTPError(status, body)
    return body


def _post(
    url: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout_s: float,
    session: requests.Session | None,
    expected: int,
) -> Any:
    poster = session or requests
    response = poster.post(
        f"{url.rstrip('/')}{path}", json=body, headers=headers, timeout=timeout_s
    )
    return _document(response.status_code, response.text, expected)


async def _post_async(
    url: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout_s: float,
    session: aiohttp.ClientSession | None,
    expected: int,
) -> Any:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    own = session is None
    client = session or aiohttp.ClientSession()
    try:
        async with client.post(
            f"{url.rstrip('/')}{path}", json=body, headers=headers, timeout=timeout
        ) as response:
            return _document(response.status, await response.text(), expected)
    finally:
        if own:
            await client.close()


def recommend(
    url: str,
    *,
    user_id: str | None = None,
    result_size: int | None = None,
    context: dict[str, Any] | None = None,
    token: str | None = None,
    request_id: str | None = None,
    timeout_s: float = 5.0,
    session: requests.Session | None = None,
) -> RecommendationResponse:
    """Ask the gateway at `url` for recommendations; raise `GatewayHTTPError` on an error status."""
    body, headers = _request(user_id, result_size, context), _headers(token, request_id)
    answer = _post(url, "/recommendation", body, headers, timeout_s, session, 200)
    return RecommendationResponse.model_validate(answer)


async def recommend_async(
    url: str,
    *,
    user_id: str | None = None,
    result_size: int | None = None,
    context: dict[str, Any] | None = None,
    token: str | None = None,
    request_id: str | None = None,
    timeout_s: float = 5.0,
    session: aiohttp.ClientSession | None = None,
) -> RecommendationResponse:
    """The same as `recommend`, with aiohttp; pass a `session` to reuse its connections."""
    body, headers = _request(user_id, result_size, context), _headers(token, request_id)
    answer = await _post_async(url, "/recommendation", body, headers, timeout_s, session, 200)
    return RecommendationResponse.model_validate(answer)


def send_feedback(
    url: str,
    events: Sequence[FeedbackEventBody],
    *,
    token: str | None = None,
    timeout_s: float = 5.0,
    session: requests.Session | None = None,
) -> FeedbackReceipt:
    """Post users' events on answers' items to `/feedback`, one request for all of them.

    Returns the 202 receipt (a batch that was partly refused lists what in `rejected`); raises
    `GatewayHTTPError` on an error status: 404 (unknown or expired request, or feedback off),
    422 (an item that answer did not show), 413 (more than `feedback.max_events`), 503.
    """
    receipt = _post(url, "/feedback", _feedback(events), _headers(token), timeout_s, session, 202)
    return FeedbackReceipt.model_validate(receipt)


async def send_feedback_async(
    url: str,
    events: Sequence[FeedbackEventBody],
    *,
    token: str | None = None,
    timeout_s: float = 5.0,
    session: aiohttp.ClientSession | None = None,
) -> FeedbackReceipt:
    """The same as `send_feedback`, with aiohttp; pass a `session` to reuse its connections."""
    body, headers = _feedback(events), _headers(token)
    receipt = await _post_async(url, "/feedback", body, headers, timeout_s, session, 202)
    return FeedbackReceipt.model_validate(receipt)


def main(argv: list[str] | None = None) -> int:
    """The command line: one request, its response printed as JSON."""
    parser = argparse.ArgumentParser(prog="python -m gateway.sdk", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the gateway's base URL")
    parser.add_argument("--user", help="user_id")
    parser.add_argument("--size", type=int, help="resultSize (1-100)")
    parser.add_argument("--context", type=json.loads, help="context, as a JSON object")
    parser.add_argument("--token", help=f"API token ({TOKEN_HEADER})")
    parser.add_argument("--request-id", help=f"{REQUEST_ID_HEADER} to send")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        answer = asyncio.run(
            recommend_async(
                args.url,
                user_id=args.user,
                result_size=args.size,
                context=args.context,
                token=args.token,
                request_id=args.request_id,
                timeout_s=args.timeout,
            )
        )
    except GatewayHTTPError as exc:
        print(json.dumps(exc.body, indent=2), file=sys.stderr)
        return 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"gateway.sdk: cannot reach {args.url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print(answer.model_dump_json(indent=2, exclude_none=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
