"""`POST /feedback` and `GET /experiments` over real HTTP, against the real mocks.

The fast tests serve the app in this process on the ASGI stack (and once as WSGI), with an
SQLite store in the test's directory, flushed every 20 ms; the slow ones run two gunicorn
instances on one store (a Redis server, or one SQLite file).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from gateway.contract.feedback_schemas import ExperimentsReport, FeedbackReceipt
from gateway.feedback.impressions import ShownItems, hash_user
from gateway.feedback.sqlite_store import SQLiteStore
from gateway.web.app import GatewayFlask, create_app
from mock_recommenders import MockFleet, MockFleetProcess
from tests.helpers import (
    Serve,
    assert_json_error,
    closed_port,
    gunicorn,
    recommend,
    sample,
    settings_for,
    wait_until,
)
from tests.redis_server import RedisServer

SALT = "test-salt"
NAMES = ("sml", "asc", "trd", "psn")


def feedback_app(
    fleet: MockFleet, tmp_path: Path, top: dict[str, Any] | None = None, **feedback: Any
) -> GatewayFlask:
    """The gateway in front of `fleet` with feedback on in `tmp_path`'s SQLite file."""
    feedback = {
        "store": f"sqlite:///{tmp_path / 'feedback.db'}",
        "salt": SALT,
        "flush_interval_ms": 20,
        "report_refresh_ms": 0,
        **feedback,
    }
    return create_app(settings_for(fleet, feedback=feedback, **(top or {})))


@pytest.fixture
def url(fleet: MockFleet, serve: Serve, tmp_path: Path) -> str:
    return serve(feedback_app(fleet, tmp_path, max_events=3))


def shown(url: str, user: str = "u1", **body: Any) -> dict[str, Any]:
    """A /recommendation answer (6 fused items) for `user`."""
    response = recommend(url, {"user_id": user, "resultSize": 6, **body})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def post(url: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(f"{url}/feedback", json=body, timeout=30, **kwargs)


def click(answer: dict[str, Any], position: int = 0, **fields: Any) -> dict[str, Any]:
    """A click on the item at `position` of the answer's fused ranking."""
    item = answer["fused"][position]["id"]
    return {"request_id": answer["request_id"], "item_id": item, "event": "click", **fields}


def report(url: str, impressions: int = 0, **kwargs: Any) -> dict[str, Any]:
    """GET /experiments, once it counts at least `impressions` stored.

    A GET writes nothing: the impressions the worker holds reach the store by its writer,
    every `flush_interval_ms`, so a test that counts them waits for them.
    """
    found: list[dict[str, Any]] = []

    def counted() -> bool:
        response = requests.get(f"{url}/experiments", timeout=30, **kwargs)
        assert response.status_code == 200, response.text
        found[:] = [response.json()]
        return int(found[0]["impressions_stored"]) >= impressions

    wait_until(counted, 10, f"/experiments never counted {impressions} impressions")
    ExperimentsReport.model_validate(found[0])  # the documented shape
    return found[0]


def stored(database: Path, request_id: str) -> ShownItems:
    """The record the gateway wrote for `request_id`, read from its SQLite file."""
    found: list[ShownItems] = []

    def written() -> bool:
        try:
            # Read-only: never creates the file, nor races the gateway making its schema.
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
                row = db.execute(
                    "SELECT body FROM impression WHERE request_id = ?", (request_id,)
                ).fetchone()
            db.close()
        except sqlite3.OperationalError:  # no file or no table yet
            return False
        if row is not None:
            found.append(ShownItems.from_json(row[0]))
        return bool(found)

    wait_until(written, 10, f"impression {request_id} never written")
    return found[0]


# --- Validation -----------------------------------------------------------------------------


def test_feedback_off_answers_404_naming_the_setting(gateway_url: str) -> None:
    for response in (
        post(gateway_url, {"request_id": "r", "item_id": "i", "event": "click"}),
        requests.get(f"{gateway_url}/experiments", timeout=30),
    ):
        assert_json_error(response, 404, "feedback is off", "GATEWAY_FEEDBACK__STORE")


def test_a_click_is_accepted_once_per_event_id(url: str) -> None:
    answer = shown(url)

    first = post(url, click(answer, event_id="e1"))
    again = post(url, click(answer, event_id="e1"))
    other = post(url, click(answer))  # no event id: every one counts

    assert first.status_code == 202
    assert FeedbackReceipt.model_validate(first.json())
    assert first.json() == {"accepted": 1, "duplicates": 0}
    assert again.json() == {"accepted": 0, "duplicates": 1}
    assert other.json() == {"accepted": 1, "duplicates": 0}
    assert report(url)["events"] == {"click": 2, "purchase": 0, "dismiss": 0}


def test_concurrent_single_events_each_get_their_own_answer(url: str) -> None:
    """Judged together or not (`gateway.feedback.judge`), each request answers for its event."""
    answer = shown(url)
    bodies = [click(answer, event_id="same") for _ in range(8)]
    bodies += [click(answer, position=n % 6) for n in range(16)]
    bodies += [{**click(answer), "item_id": "not-an-item"}] * 4
    bodies += [{"request_id": "never-served", "item_id": "i1", "event": "click"}] * 4

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda body: post(url, body), bodies))

    receipts = [response.json() for response in answers[:24]]
    assert sorted(r["accepted"] for r in receipts[:8]) == [0] * 7 + [1]
    # Without an event_id a click is known by its item within the answer: 16 clicks on 6 items
    # count 6, whichever of each item's came first, and the others are duplicates.
    assert sorted(r["accepted"] for r in receipts[8:]) == [0] * 10 + [1] * 6
    assert all(r["accepted"] + r["duplicates"] == 1 for r in receipts[8:])
    assert [response.status_code for response in answers[24:]] == [422] * 4 + [404] * 4
    assert report(url)["events"]["click"] == 1 + 6


def test_an_unknown_request_is_404_and_an_item_not_shown_422(url: str) -> None:
    answer = shown(url)

    unknown = post(url, {"request_id": "never-served", "item_id": "i1", "event": "click"})
    assert_json_error(unknown, 404, "'never-served' is unknown or has expired")
    not_shown = post(url, {**click(answer), "item_id": "not-an-item"})
    assert_json_error(not_shown, 422, "'not-an-item' was not shown", answer["request_id"])


def test_a_batch_lists_what_it_refused_and_is_an_error_when_nothing_was_accepted(
    url: str,
) -> None:
    answer = shown(url)
    unknown = {"request_id": "never-served", "item_id": "i1", "event": "click"}
    not_shown = {**click(answer), "item_id": "not-an-item"}

    mixed = post(url, {"events": [click(answer, event_id="e"), not_shown, unknown]})
    duplicate = post(url, {"events": [click(answer, event_id="e")]})
    refused = post(url, {"events": [unknown, unknown]})
    refused_too = post(url, {"events": [not_shown, unknown]})

    assert mixed.status_code == 202
    assert mixed.json()["accepted"] == 1 and mixed.json()["duplicates"] == 0
    assert [(r["index"], r["status"]) for r in mixed.json()["rejected"]] == [(1, 422), (2, 404)]
    assert "'not-an-item' was not shown" in mixed.json()["rejected"][0]["message"]
    assert duplicate.json() == {"accepted": 0, "duplicates": 1}
    body = assert_json_error(refused, 404, "none of the 2 events was accepted")
    assert [r["status"] for r in body["error"]["rejected"]] == [404, 404]
    body = assert_json_error(refused_too, 422, "1 name an unknown or expired request")
    assert [r["status"] for r in body["error"]["rejected"]] == [422, 404]


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        ({"events": [{"request_id": "r", "item_id": "i", "event": "click"}] * 4}, 413, "at most 3"),
        ({"events": []}, 422, "events"),
        ({"events": "all"}, 422, "events"),
        ({"request_id": "r", "item_id": "i", "event": "like"}, 422, "event"),
        ({"request_id": "r", "item_id": "i", "event": "click", "extra": 1}, 422, "extra"),
        ({"request_id": "", "item_id": "i", "event": "click"}, 422, "request_id"),
        ({"item_id": "i", "event": "click"}, 422, "request_id"),
        ([{"request_id": "r", "item_id": "i", "event": "click"}], 400, "JSON object"),
    ],
)
def test_a_bad_body_is_refused_naming_the_problem(
    url: str, body: Any, status: int, phrase: str
) -> None:
    assert_json_error(post(url, body), status, phrase)


def test_a_body_that_is_not_json_is_400(url: str) -> None:
    response = requests.post(f"{url}/feedback", data=b"{nope", timeout=30)

    assert_json_error(response, 400, "not valid JSON")


def test_feedback_and_experiments_need_the_token_whatever_the_metrics_do(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    # /experiments shows business data (counts, arms, weights): a token whenever keys are set,
    # as /feedback; `metrics_require_token` is for /metrics, which Prometheus scrapes.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    open_metrics = serve(feedback_app(fleet, tmp_path / "a", {"api_keys": ["k"]}))
    closed_metrics = serve(
        feedback_app(fleet, tmp_path / "b", {"api_keys": ["k"], "metrics_require_token": True})
    )
    event = {"request_id": "r", "item_id": "i", "event": "click"}
    token = {"X-Api-Token": "k"}

    assert_json_error(post(open_metrics, event), 401, "missing X-Api-Token")
    assert_json_error(post(open_metrics, event, headers={"X-Api-Token": "x"}), 401, "invalid")
    assert_json_error(post(open_metrics, event, headers=token), 404, "unknown")
    for url in (open_metrics, closed_metrics):
        unguarded = requests.get(f"{url}/experiments", timeout=30)
        assert_json_error(unguarded, 401, "missing X-Api-Token")
        wrong = requests.get(f"{url}/experiments", headers={"X-Api-Token": "x"}, timeout=30)
        assert_json_error(wrong, 401, "invalid API token")
        assert report(url, headers=token)["impressions_stored"] == 0
    assert requests.get(f"{open_metrics}/metrics", timeout=30).status_code == 200


def test_a_store_that_fails_is_503_and_answers_are_still_served(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    with closed_port() as port:
        app = feedback_app(
            fleet, tmp_path, store=f"redis://127.0.0.1:{port}/0", flush_interval_ms=50
        )
        url = serve(app)

        def counted() -> str:
            return requests.get(f"{url}/metrics", timeout=30).text

        before = counted()
        answer = shown(url)
        assert_json_error(post(url, click(answer)), 503, "feedback store is unavailable")
        response = requests.get(f"{url}/experiments", timeout=30)
        assert_json_error(response, 503, "feedback store is unavailable")
        assert shown(url)["fused"]

        # Each failure is counted by what failed; the writer's impressions wait, and say so.
        errors = "gateway_feedback_store_errors_total"

        def failed(operation: str) -> float:
            return sample(counted(), errors, operation=operation) - sample(
                before, errors, operation=operation
            )

        assert (failed("judge"), failed("report")) == (1, 1)
        wait_until(lambda: failed("save") >= 1, 10, "the writer's failures are not counted")
        waiting = "gateway_feedback_impressions_waiting"
        wait_until(lambda: sample(counted(), waiting) >= 2, 10, "no impressions shown waiting")


def test_a_worker_with_too_many_events_waiting_answers_503_busy(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    app = feedback_app(fleet, tmp_path, event_queue_limit=1)
    url = serve(app)
    answer = shown(url)
    database = tmp_path / "feedback.db"
    stored(database, answer["request_id"])
    judge = app.runtime.feedback.events
    # Another process holds the file's write lock: the event thread waits for it.
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(post, url, click(answer))
            wait_until(lambda: judge.groups == 1, 10, "the first event never reached the store")
            second = pool.submit(post, url, click(answer, position=1))
            wait_until(lambda: judge.waiting == 1, 10, "the second event never queued")

            busy = post(url, click(answer, position=2))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert_json_error(
            busy, 503, "the feedback store is busy: events waiting to be judged in this worker: 1 "
        )
        assert busy.headers["Retry-After"] == "1"
        assert first.result().json() == second.result().json() == {"accepted": 1, "duplicates": 0}
    assert report(url)["events"]["click"] == 2


def test_feedback_is_served_as_wsgi_too(
    fleet: MockFleet, serve_wsgi: Serve, tmp_path: Path
) -> None:
    url = serve_wsgi(feedback_app(fleet, tmp_path))

    assert post(url, click(shown(url))).json() == {"accepted": 1, "duplicates": 0}
    assert report(url)["events"]["click"] == 1


# --- What is counted ------------------------------------------------------------------------


def test_clicks_credit_the_interleaving_team_or_the_sources_and_compare_teams_pairwise(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    url = serve(feedback_app(fleet, tmp_path))
    # 8 items from 4 teams: two rounds, two items per team.
    interleaved = shown(url, fusion="interleave", resultSize=8)
    fused = shown(url, user="u2", fusion="rrf")
    impression = stored(tmp_path / "feedback.db", interleaved["request_id"])
    team_of = {shown_item.item_id: str(shown_item.team) for shown_item in impression.items()}
    assert [team_of[item["id"]] for item in interleaved["fused"]] == [
        shown_item.team for shown_item in impression.items()
    ]
    winner = team_of[interleaved["fused"][0]["id"]]
    runner_up = next(team for team in team_of.values() if team != winner)
    loser = next(team for team in team_of.values() if team not in (winner, runner_up))
    by_team = {team: [i for i, t in team_of.items() if t == team] for team in NAMES}

    events = [
        {"request_id": interleaved["request_id"], "item_id": item, "event": event}
        for item, event in [
            (by_team[winner][0], "click"),
            (by_team[winner][1], "purchase"),
            (by_team[runner_up][0], "click"),
            (by_team[loser][0], "dismiss"),
        ]
    ]
    events.append(click(fused))
    assert post(url, {"events": events}).json() == {"accepted": 5, "duplicates": 0}
    experiments = report(url)

    # By hand: 2 credits to the winner, 1 to the runner-up on the interleaved answer (the
    # dismiss credits nobody); the RRF answer's top item splits 1 between its sources.
    credit = dict.fromkeys(NAMES, 0.0)
    credit[winner] += 2
    credit[runner_up] += 1
    sources = [source["name"] for source in fused["fused"][0]["sources"]]
    for name in sources:
        credit[name] += 1 / len(sources)
    in_rrf = {source["name"] for item in fused["fused"] for source in item["sources"]}
    for name in NAMES:
        counted = experiments["recommenders"][name]
        assert counted["credit"] == pytest.approx(credit[name] / 4)
        assert counted["impressions"] == 1 + (name in in_rrf)
        assert counted["weight"] == experiments["weights"]["in_use"][name]
    assert experiments["recommenders"][winner]["clicks"] == 2 + (winner in sources)
    # Pairwise, on the one interleaved answer: winner 2 clicks, runner-up 1, the others 0.
    clicks = dict.fromkeys(NAMES, 0) | {winner: 2, runner_up: 1}
    expected = [
        {
            "a": a,
            "b": b,
            "wins": int(clicks[a] > clicks[b]),
            "losses": int(clicks[a] < clicks[b]),
            "ties": int(clicks[a] == clicks[b]),
        }
        for a in sorted(NAMES)
        for b in sorted(NAMES)
        if a < b
    ]
    counts = ("a", "b", "wins", "losses", "ties")
    assert [{k: pair[k] for k in counts} for pair in experiments["pairwise"]] == expected
    for pair in experiments["pairwise"]:
        decided = pair["wins"] + pair["losses"]
        assert pair["preference"] == (pair["wins"] / decided if decided else 0.5)
        assert 0 <= pair["low"] <= pair["preference"] <= pair["high"] <= 1
    assert experiments["events"] == {"click": 3, "purchase": 1, "dismiss": 1}
    assert experiments["impressions_stored"] == 2
    assert experiments["arms"] == {}
    assert experiments["weights"]["evidence"] == len(expected)


def test_arms_split_users_by_share_and_keep_each_user_in_theirs(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    arms = [
        {"name": "control", "fusion": "rrf", "share": 3},
        {"name": "explore", "fusion": "interleave", "share": 1},
    ]
    url = serve(feedback_app(fleet, tmp_path, experiments={"arms": arms}))
    users = [f"user-{n}" for n in range(120)]

    answers = {user: shown(url, user=user) for user in users}
    first = {user: answer["fusion"] for user, answer in answers.items()}
    again = {user: shown(url, user=user)["fusion"] for user in users[:30]}
    outside = shown(url, user=users[0], fusion="concat")

    assert all(again[user] == first[user] for user in again)  # sticky
    # Each answer names its arm, so that the frontend can log it beside its own events.
    arm_of = {"rrf": "control", "interleave": "explore"}
    assert all(answer["arm"] == arm_of[answer["fusion"]] for answer in answers.values())
    assert "arm" not in outside
    explored = sum(fusion == "interleave" for fusion in first.values())
    assert 12 <= explored <= 50, explored  # a quarter of 120, within 3.5 standard deviations
    assert outside["fusion"] == "concat"
    counted = report(url, impressions=len(first) + len(again) + 1)["arms"]
    assert set(counted) == {"control", "explore"}
    assert counted["explore"]["fusion"] == "interleave"
    explore_again = sum(fusion == "interleave" for fusion in again.values())
    assert counted["explore"]["impressions"] == explored + explore_again
    # The request that named its fusion is in no arm.
    assert sum(arm["impressions"] for arm in counted.values()) == len(first) + len(again)


def test_arm_ctr_counts_impressions_with_a_click(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    arms = [{"name": "only", "fusion": "rrf", "share": 1}]
    url = serve(feedback_app(fleet, tmp_path, experiments={"arms": arms}))
    answers = [shown(url, user=f"user-{n}") for n in range(4)]

    post(url, {"events": [click(answers[0]), click(answers[0], 1), click(answers[1])]})

    only = report(url, impressions=4)["arms"]["only"]
    assert (only["impressions"], only["clicked_impressions"], only["clicks"]) == (4, 2, 3)
    assert only["ctr"] == 0.5
    assert only["low"] < 0.5 < only["high"]


def learning_stream(url: str, database: Path, favourite: str, answers: int) -> None:
    """Interleaved answers on which users click only `favourite`'s items."""
    for n in range(answers):
        answer = shown(url, user=f"user-{n}", fusion="interleave")
        impression = stored(database, answer["request_id"])
        item = next(i.item_id for i in impression.items() if i.team == favourite)
        assert post(url, click(answer) | {"item_id": item}).status_code == 202


LEARNER = {
    "interval_s": 0.05,
    "min_evidence": 6,
    "beta": 4.0,
    "prior": 4.0,
    "floor": 0.1,
    "max_weight": 4.0,
}


def test_the_learner_moves_weight_to_the_recommender_users_prefer(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    arms = [{"name": "learned", "fusion": "rrf", "share": 1, "weights": "learned"}]
    url = serve(feedback_app(fleet, tmp_path, experiments={"arms": arms}, learner=LEARNER))

    learning_stream(url, tmp_path / "feedback.db", "asc", answers=4)
    # asc won each of its 3 comparisons on 4 answers: margin 12/16 with prior 4, e^3 clipped
    # to 4; the others lost 4 each: margin -4/8, e^-2.
    expected = {"sml": 0.135335, "asc": 4.0, "trd": 0.135335, "psn": 0.135335}
    wait_until(
        lambda: report(url)["weights"]["in_use"] == expected,
        10,
        lambda: f"the weights did not move as expected: {report(url)['weights']}",
    )

    weights = report(url)["weights"]
    assert weights["evidence"] == 4 * 6
    assert weights["version"] >= 1 and weights["updated_at"] is not None
    assert weights["learning"] and not weights["frozen"]
    assert weights["initial"] == dict.fromkeys(NAMES, 1.0)
    assert report(url)["recommenders"]["asc"]["weight"] == 4.0
    # The learned arm now fuses with them: asc's first item leads.
    answer = shown(url, user="someone-new")
    top = answer["fused"][0]["sources"]
    assert any(source["name"] == "asc" and source["rank"] == 1 for source in top), top
    rendered = requests.get(f"{url}/metrics", timeout=30).text
    assert sample(rendered, "gateway_feedback_learned_weight", recommender="asc") == 4.0
    assert sample(rendered, "gateway_feedback_learner_updates_total") >= 1


def test_a_frozen_learner_holds_the_weights(fleet: MockFleet, serve: Serve, tmp_path: Path) -> None:
    url = serve(feedback_app(fleet, tmp_path, learner=LEARNER | {"frozen": True}))

    learning_stream(url, tmp_path / "feedback.db", "asc", answers=4)
    time.sleep(5 * LEARNER["interval_s"])

    weights = report(url)["weights"]
    assert weights["frozen"] and weights["evidence"] == 24
    assert weights["in_use"] == dict.fromkeys(NAMES, 1.0)
    assert weights["version"] == 0


def test_impressions_expire_after_the_retention(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    url = serve(feedback_app(fleet, tmp_path, retention_s=1.0))
    answer = shown(url)
    assert post(url, click(answer)).status_code == 202

    time.sleep(1.2)

    assert_json_error(post(url, click(answer)), 404, "unknown or has expired", "kept 1 s")
    assert report(url)["impressions_stored"] == 0


def test_the_store_keeps_no_user_neither_the_id_nor_its_pseudonym(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    url = serve(feedback_app(fleet, tmp_path))
    answer = shown(url, user="alice@example.com")

    impression = stored(tmp_path / "feedback.db", answer["request_id"])

    assert [item.item_id for item in impression.items()] == [i["id"] for i in answer["fused"]]
    contents = b"".join(path.read_bytes() for path in tmp_path.glob("feedback.db*"))
    assert b"alice@example.com" not in contents
    assert hash_user("alice@example.com", SALT).encode() not in contents


def test_feedback_is_counted_in_the_metrics(url: str) -> None:
    def counted() -> str:
        return requests.get(f"{url}/metrics", timeout=30).text

    before = counted()
    answer = shown(url)
    post(url, {"events": [click(answer), {**click(answer), "item_id": "nope"}]})
    after = counted()

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    events = "gateway_feedback_events_total"
    assert delta(events, kind="click", result="accepted") == 1
    assert delta(events, kind="click", result="item_not_shown") == 1
    assert delta("gateway_feedback_impressions_total", outcome="recorded") == 1


# --- Scaled out -----------------------------------------------------------------------------


@pytest.fixture(params=["redis", "sqlite"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One store two gateway instances share: a Redis server, or one SQLite file."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with RedisServer(tmp_path) as server:
        yield server.url(0)


@pytest.mark.slow
def test_two_instances_on_one_store_count_as_one(
    fleet_process: MockFleetProcess, shared_store: str
) -> None:
    env = {
        "GATEWAY_FEEDBACK__STORE": shared_store,
        "GATEWAY_FEEDBACK__SALT": SALT,
        "GATEWAY_FEEDBACK__FLUSH_INTERVAL_MS": "20",
    }
    with (
        gunicorn(fleet_process, "--workers", "2", **env) as a,
        gunicorn(fleet_process, "--workers", "2", **env) as b,
    ):
        answers = [shown(a.url, user=f"user-{n}") for n in range(6)]
        answers += [shown(b.url, user=f"user-{n}") for n in range(6, 10)]
        # Written by their worker within a flush interval; a busy machine may take longer
        # (an event that comes first is judged once more after two intervals).
        time.sleep(0.3)

        # Each click goes to the other instance than the one that answered.
        to_b = post(b.url, {"events": [click(answer) for answer in answers[:6]]})
        to_a = post(a.url, {"events": [click(answer, 1) for answer in answers[6:]]})

        assert to_b.json() == {"accepted": 6, "duplicates": 0}
        assert to_a.json() == {"accepted": 4, "duplicates": 0}
        assert post(a.url, click(answers[0], event_id="x")).json()["accepted"] == 1
        assert post(b.url, click(answers[0], event_id="x")).json()["duplicates"] == 1
        seen_by_a, seen_by_b = report(a.url), report(b.url)
        for seen in (seen_by_a, seen_by_b):
            assert seen["events"]["click"] == 11
            assert seen["impressions_stored"] == 10
            assert sum(r["impressions"] for r in seen["recommenders"].values()) >= 10
        assert seen_by_a["recommenders"] == seen_by_b["recommenders"]
        assert seen_by_a["pairwise"] == seen_by_b["pairwise"]

    if shared_store.startswith("redis"):
        contents = redis_contents(shared_store)
        assert "imp:" + answers[1]["request_id"] in contents
        assert hash_user("user-1", SALT) not in contents
        assert "user-1" not in contents


def redis_contents(url: str) -> str:
    """Every key and value in the Redis database at `url`, as one text."""
    client: Any = redis.Redis.from_url(url, decode_responses=True)  # its stubs say bytes | str
    try:
        parts: list[str] = []
        for key in client.keys("*"):
            kind = client.type(key)
            parts.append(key)
            if kind == "hash":
                parts.extend(f"{k}={v}" for k, v in client.hgetall(key).items())
            elif kind == "zset":
                parts.extend(client.zrange(key, 0, -1))
            elif kind == "string":
                parts.append(client.get(key) or "")
        return "\n".join(parts)
    finally:
        client.close()


def test_a_get_of_experiments_writes_nothing(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    # The writer would not write for a minute: what a GET reads is what the store holds.
    url = serve(feedback_app(fleet, tmp_path, flush_interval_ms=60_000))
    answer = shown(url)

    assert report(url)["impressions_stored"] == 0  # held by the worker, not written by a GET
    assert post(url, click(answer)).status_code == 202  # judging writes what is held first
    assert report(url)["impressions_stored"] == 1


def test_experiments_answers_from_a_snapshot_within_its_refresh(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    url = serve(feedback_app(fleet, tmp_path, report_refresh_ms=60_000))
    answer = shown(url)
    first = report(url)

    assert post(url, click(answer)).status_code == 202
    assert report(url) == first  # the same snapshot: the store is read once per refresh
    assert first["events"]["click"] == 0


# --- Every answer of /feedback is true --------------------------------------------------------


@contextlib.contextmanager
def write_lock(database: Path) -> Iterator[None]:
    """SQLite's write lock on `database`, held by another connection (as another process would)."""
    holder = sqlite3.connect(database, isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


def test_a_click_the_store_could_not_take_is_a_503_and_never_counted_later(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    url = serve(feedback_app(fleet, tmp_path, store_timeout_ms=300, answer_within_ms=300))
    answer = shown(url)
    stored(tmp_path / "feedback.db", answer["request_id"])

    with write_lock(tmp_path / "feedback.db"):
        refused = post(url, click(answer))
    assert_json_error(refused, 503, "the feedback store is unavailable", "locked")

    time.sleep(0.5)  # anything still on its way to the store would have landed by now
    assert report(url)["events"]["click"] == 0  # a 5xx: nothing of it counted, now or later
    retried = post(url, click(answer))
    assert retried.json() == {"accepted": 1, "duplicates": 0}
    assert report(url)["events"]["click"] == 1


def test_events_that_wait_past_their_turn_are_withdrawn_not_counted(
    fleet: MockFleet, serve: Serve, tmp_path: Path
) -> None:
    # The store holds a first click in its transaction (the lock is another's) for up to 5 s;
    # a second click waits behind it for 200 ms, is withdrawn and answered 503.
    url = serve(feedback_app(fleet, tmp_path, store_timeout_ms=5000, answer_within_ms=200))
    answers = [shown(url, user=f"u{n}") for n in range(2)]
    for answer in answers:
        stored(tmp_path / "feedback.db", answer["request_id"])

    with ThreadPoolExecutor(1) as pool:
        with write_lock(tmp_path / "feedback.db"):
            first = pool.submit(post, url, click(answers[0]))
            time.sleep(0.5)  # taken to the store, waiting for the lock
            second = post(url, click(answers[1]))
            assert not first.done()
        answered = first.result(timeout=30)  # the lock is free: the first is counted
    assert_json_error(second, 503, "withdrawn", "none was counted")
    assert second.headers["Retry-After"] == "1"
    assert answered.json() == {"accepted": 1, "duplicates": 0}

    time.sleep(0.5)
    assert report(url)["events"]["click"] == 1  # the first only


def test_a_store_opened_while_its_file_was_read_only_heals_once_it_is_writable(
    fleet: MockFleet, serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the file and its WAL could not be written when the worker first connected: SQLite
    # then opens the connection read-only, and it stays so.
    database = tmp_path / "feedback.db"
    read_only = [True]
    connect = sqlite3.connect

    def connecting(path: Any, **kwargs: Any) -> sqlite3.Connection:
        if read_only[0] and Path(path) == database:
            path, kwargs = f"file:{database}?mode=ro", {**kwargs, "uri": True}
        made: sqlite3.Connection = connect(path, **kwargs)
        return made

    made = SQLiteStore(database, retention_s=3600)  # the file, its WAL and its schema exist
    made.stats()
    made.close()
    monkeypatch.setattr("gateway.feedback.sqlite_store.sqlite3.connect", connecting)
    url = serve(feedback_app(fleet, tmp_path))
    answer = shown(url)

    refused = post(url, click(answer))
    assert_json_error(refused, 503, "the feedback store is unavailable", "readonly")

    read_only[0] = False  # writable again: no restart
    wait_until(
        lambda: post(url, click(answer)).status_code in (202, 404), 10, "the store never healed"
    )
    again = shown(url)  # a new answer, written by a fresh connection
    assert post(url, click(again)).json() == {"accepted": 1, "duplicates": 0}


def test_a_retry_without_an_event_id_counts_once(url: str) -> None:
    # A client that got no answer, or a 5xx, sends the same click again, naming nothing.
    answer = shown(url)

    first = post(url, click(answer, position=2))
    again = post(url, click(answer, position=2))
    other_kind = post(url, {**click(answer, position=2), "event": "purchase"})

    assert first.json() == {"accepted": 1, "duplicates": 0}
    assert again.json() == {"accepted": 0, "duplicates": 1}
    assert other_kind.json() == {"accepted": 1, "duplicates": 0}  # a purchase is another event
    assert report(url)["events"]["click"] == 1
