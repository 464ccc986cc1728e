"""The client: sync, async and command line, against the real app and mocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.sdk import (
    FeedbackEventBody,
    GatewayHTTPError,
    recommend,
    recommend_async,
    send_feedback,
    send_feedback_async,
)
from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet
from mock_recommenders.ranking import rank_items
from tests.helpers import ROOT, Serve, closed_port, settings_for


def test_recommend_returns_the_typed_answer(gateway_url: str, fleet: MockFleet) -> None:
    answer = recommend(
        gateway_url, user_id="c1", result_size=2, context={"page": "home"}, request_id="c-1"
    )

    assert answer.request_id == "c-1"
    assert answer.complete is True
    assert [entry.name for entry in answer.result] == list(DEFAULT_NAMES)
    assert answer.result[0].prediction["items"] == rank_items("sml", "c1", 2)
    seen = fleet.last_request("sml")
    assert seen is not None and seen["body"]["context"] == {"page": "home"}


async def test_recommend_async_with_and_without_a_session(gateway_url: str) -> None:
    answer = await recommend_async(gateway_url, user_id="c2")
    assert answer.complete is True

    async with aiohttp.ClientSession() as session:
        again = await recommend_async(gateway_url, user_id="c2", session=session)
    assert [e.prediction["items"] for e in again.result] == [
        e.prediction["items"] for e in answer.result
    ]


def test_error_statuses_raise_with_the_message(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, api_keys=["secret"])))

    with pytest.raises(GatewayHTTPError, match="HTTP 401: missing X-Api-Token header") as caught:
        recommend(url, user_id="c3")
    assert caught.value.status == 401

    assert recommend(url, user_id="c3", token="secret").complete is True
    with pytest.raises(GatewayHTTPError, match="HTTP 422: invalid request: resultSize"):
        recommend(url, result_size=0, token="secret")


def test_feedback_is_sent_alone_or_in_a_batch_and_refusals_raise(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    feedback = {"store": f"sqlite:///{tmp_path / 'f.db'}", "salt": "s", "flush_interval_ms": 20}
    url = serve(create_app(settings_for(fleet, api_keys=["secret"], feedback=feedback)))
    answer = recommend(url, user_id="c4", result_size=4, token="secret")
    first, second = (item.id for item in answer.fused[:2])

    def event(item: str, **fields: str) -> FeedbackEventBody:
        return FeedbackEventBody(
            request_id=answer.request_id, item_id=item, event="click", **fields
        )

    alone = send_feedback(url, [event(first, event_id="e1")], token="secret")
    assert (alone.accepted, alone.duplicates, alone.rejected) == (1, 0, None)
    batch = send_feedback(
        url, [event(first, event_id="e1"), event(second), event("not-shown")], token="secret"
    )
    assert (batch.accepted, batch.duplicates) == (1, 1)
    assert batch.rejected is not None and [r.index for r in batch.rejected] == [2]

    with pytest.raises(GatewayHTTPError, match="HTTP 422") as caught:
        send_feedback(url, [event("not-shown")], token="secret")
    assert caught.value.status == 422
    with pytest.raises(GatewayHTTPError, match="HTTP 401"):
        send_feedback(url, [event(first)])
    with pytest.raises(ValueError, match="at least one event"):
        send_feedback(url, [], token="secret")


async def test_send_feedback_async_posts_the_same_body(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    feedback = {"store": f"sqlite:///{tmp_path / 'f.db'}", "salt": "s", "flush_interval_ms": 20}
    url = serve(create_app(settings_for(fleet, feedback=feedback)))
    answer = await recommend_async(url, user_id="c5", result_size=3)
    click = FeedbackEventBody(
        request_id=answer.request_id, item_id=answer.fused[0].id, event="purchase"
    )

    receipt = await send_feedback_async(url, [click])
    assert receipt.accepted == 1
    with pytest.raises(GatewayHTTPError, match="HTTP 404"):
        unknown = click.model_copy(update={"request_id": "never-served"})
        await send_feedback_async(url, [unknown])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.sdk", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_the_command_line_prints_the_response(gateway_url: str) -> None:
    done = run_cli("--url", gateway_url, "--user", "u1", "--size", "1")

    assert done.returncode == 0, done.stderr
    assert '"complete": true' in done.stdout
    assert rank_items("psn", "u1", 1)[0]["id"] in done.stdout


@pytest.mark.slow
def test_the_command_line_reports_errors_and_unreachable_gateways(gateway_url: str) -> None:
    bad = run_cli("--url", gateway_url, "--size", "0")
    assert bad.returncode == 1
    assert "resultSize" in bad.stderr

    with closed_port() as port:
        down = run_cli("--url", f"http://127.0.0.1:{port}", "--timeout", "30")
    assert down.returncode == 1
    assert "cannot reach" in down.stderr
