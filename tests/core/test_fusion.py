"""Fusion strategies against examples computed by hand."""

from __future__ import annotations

import asyncio
from typing import Any, get_args

import pytest
import requests

from gateway.core.fusion import (
    FUSIONS,
    CombMnz,
    CombSum,
    Concat,
    Fuser,
    FusionName,
    Provenance,
    Ranked,
    ReciprocalRank,
    TeamDraft,
    coverage,
    ranked_from,
)
from gateway.core.outcome import Outcome
from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet, MockFleetProcess
from mock_recommenders.ranking import rank_items
from tests.helpers import Serve, gunicorn, lines, post_concurrently, settings_for

A = Ranked("A", 1.0, (("a", 0.9), ("b", 0.8), ("c", 0.1)))
B = Ranked("B", 1.0, (("b", 5.0), ("d", 3.0), ("a", 1.0)))


def ids(fused: list) -> list[str]:  # type: ignore[type-arg]
    return [item.id for item in fused]


def test_rrf_sums_reciprocal_ranks() -> None:
    fused = ReciprocalRank(k=60).fuse([A, B], 10, "r")

    # a: 1/61 + 1/63 = 0.032266; b: 1/62 + 1/61 = 0.032522; d: 1/62; c: 1/63
    assert ids(fused) == ["b", "a", "d", "c"]
    assert [item.score for item in fused] == pytest.approx(
        [1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62, 1 / 63], abs=1e-6
    )
    assert fused[0].sources == [Provenance("A", 2, 0.8), Provenance("B", 1, 5.0)]
    assert fused[2].sources == [Provenance("B", 2, 3.0)]


def test_rrf_weights_and_ties() -> None:
    x_first = Ranked("X", 1.0, (("x", None),))
    y_first = Ranked("Y", 1.0, (("y", None),))

    # A tie (1/61 each, both at rank 1) is broken by id, never by which list came first.
    assert ids(ReciprocalRank().fuse([y_first, x_first], 2, "r")) == ["x", "y"]
    heavier_y = Ranked("Y", 2.0, (("y", None),))
    assert ids(ReciprocalRank().fuse([x_first, heavier_y], 2, "r")) == ["y", "x"]


def test_weighted_is_combsum_of_min_max_normalised_scores() -> None:
    fused = CombSum().fuse([A, B], 10, "r")

    # A: a 1, b 0.875, c 0; B: b 1, d 0.5, a 0 -> b 1.875, a 1, d 0.5, c 0
    assert ids(fused) == ["b", "a", "d", "c"]
    assert [item.score for item in fused] == pytest.approx([1.875, 1.0, 0.5, 0.0])


def test_combmnz_rewards_agreement() -> None:
    fused = CombMnz().fuse([A, B], 10, "r")

    assert [(item.id, item.score) for item in fused] == [
        ("b", 3.75),
        ("a", 2.0),
        ("d", 0.5),
        ("c", 0.0),
    ]


def test_lists_without_scores_are_scored_by_rank() -> None:
    unscored = Ranked("U", 1.0, (("p", None), ("q", None), ("r", None)))

    fused = CombSum().fuse([unscored], 3, "r")

    assert [(item.id, item.score) for item in fused] == [("p", 1.0), ("q", 0.5), ("r", 0.0)]


def test_concat_keeps_first_occurrences_in_config_order() -> None:
    fused = Concat().fuse([A, B], 10, "r")

    assert ids(fused) == ["a", "b", "c", "d"]
    assert fused[3].score == 3.0
    assert ids(Concat().fuse([B, A], 2, "r")) == ["b", "d"]


def test_team_draft_takes_turns_and_is_seeded() -> None:
    fused = TeamDraft().fuse([A, B], 4, "request-1")

    assert set(ids(fused)[:2]) == {"a", "b"}  # round 1: each team's best
    assert set(ids(fused)[2:]) == {"c", "d"}  # round 2: the next ones not yet taken
    assert [item.score for item in fused] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert ids(TeamDraft().fuse([A, B], 4, "request-1")) == ids(fused)
    orders = {tuple(ids(TeamDraft().fuse([A, B], 4, f"request-{i}"))) for i in range(20)}
    assert len(orders) > 1  # the seed decides who picks first


def test_team_draft_names_the_team_that_placed_each_item_and_other_fusions_none() -> None:
    fused = TeamDraft().fuse([A, B], 4, "request-1")

    # Each round both teams pick once, each its best item not yet taken.
    first, second = fused[:2], fused[2:]
    assert {item.team for item in first} == {item.team for item in second} == {"A", "B"}
    for item in fused:
        queue = [i for i, _ in (A if item.team == "A" else B).items]
        assert item.id in queue
    by_team = {item.id: item.team for item in fused}
    assert by_team["a"] == "A" and by_team["b"] == "B"  # round 1: each team's best
    assert all(item.team is None for item in ReciprocalRank().fuse([A, B], 4, "request-1"))


def test_an_arm_weight_of_0_interleaves_the_others_alone() -> None:
    fuser = Fuser({"A": 1.0, "B": 1.0, "C": 2.0}, "rrf")
    prediction = {
        "A": {"items": [{"id": "a"}, {"id": "b"}, {"id": "c"}]},
        "B": {"items": [{"id": "b"}, {"id": "d"}, {"id": "a"}]},
        "C": {"items": [{"id": "x"}, {"id": "y"}]},
    }
    outcomes = [Outcome(name, "ok", 1.0, prediction=p) for name, p in prediction.items()]

    two_way = fuser.fuse(outcomes, "interleave", 4, "request-1", {"C": 0.0})
    all_three = fuser.fuse(outcomes, "interleave", 4, "request-1")

    # C answered but is not a team: its items are not shown, as with a configured weight 0.
    assert set(two_way.teams) == {"A", "B"}
    assert {item["id"] for item in two_way.items} == {"a", "b", "c", "d"}
    assert "C" in set(all_three.teams)
    # Coverage counts the recommenders this fusion uses: both answered.
    assert two_way.coverage == 1.0
    failed = [outcomes[0], Outcome("B", "error", 1.0), outcomes[2]]
    assert fuser.fuse(failed, "interleave", 4, "request-1", {"C": 0.0}).coverage == 0.5


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_every_strategy_truncates_and_copes_with_empty_lists(name: str) -> None:
    strategy = FUSIONS[name]()
    assert len(strategy.fuse([A, B], 2, "r")) == 2
    assert strategy.fuse([], 5, "r") == []
    assert strategy.fuse([Ranked("E", 1.0, ())], 5, "r") == []


def test_a_failed_source_drops_out_and_lowers_coverage() -> None:
    weights = {"A": 1.0, "B": 1.0, "C": 2.0}

    assert coverage([A, B], weights) == 0.5
    assert coverage([A, B, Ranked("C", 2.0, ())], weights) == 1.0
    assert ids(ReciprocalRank().fuse([A], 10, "r")) == ["a", "b", "c"]


def test_predictions_are_read_leniently() -> None:
    prediction = {
        "items": [
            {"id": "a", "score": 0.5},
            {"id": 7},
            {"id": "a", "score": 0.1},
            {"score": 1.0},
            "junk",
            {"id": "b", "score": True},
        ]
    }

    ranked = ranked_from("R", 2.0, prediction)

    assert ranked.items == (("a", 0.5), ("7", None), ("b", None))
    assert ranked_from("R", 1.0, {"no": "items"}).items == ()
    assert ranked_from("R", 1.0, ["not", "an", "object"]).items == ()


def test_every_fusion_name_has_a_strategy() -> None:
    assert set(FUSIONS) == set(get_args(FusionName))


# --- Through the gateway ---------------------------------------------------------------------


def ask(url: str, body: dict[str, Any], request_id: str | None = None) -> requests.Response:
    headers = {"X-Request-ID": request_id} if request_id else {}
    return requests.post(f"{url}/recommendation", json=body, headers=headers, timeout=30)


def test_the_response_carries_the_fused_ranking_with_provenance(gateway_url: str) -> None:
    body = ask(gateway_url, {"user_id": "f1", "resultSize": 5}).json()

    assert body["fusion"] == "rrf"
    assert body["coverage"] == 1.0
    assert len(body["fused"]) == 5
    lists = {name: rank_items(name, "f1", 5) for name in DEFAULT_NAMES}
    for item in body["fused"]:
        assert item["sources"]
        for source in item["sources"]:
            entry = lists[source["name"]][source["rank"] - 1]
            assert (entry["id"], entry["score"]) == (item["id"], source["score"])
    scores = [item["score"] for item in body["fused"]]
    assert scores == sorted(scores, reverse=True)


def test_a_failed_recommender_drops_out_of_the_fusion(fleet: MockFleet, gateway_url: str) -> None:
    fleet.set_behaviour("trd", status=500)

    body = ask(gateway_url, {"user_id": "f2", "fusion": "combmnz"}).json()

    assert body["fusion"] == "combmnz"
    assert body["coverage"] == 0.75
    assert all(s["name"] != "trd" for item in body["fused"] for s in item["sources"])


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_a_weight_of_0_is_shadow_mode_returned_but_not_fused(
    fleet: MockFleet, serve: Serve, name: str
) -> None:
    weights = {"sml": 1.0, "asc": 0.5, "trd": 0.0, "psn": 2.0}
    url = serve(create_app(settings_for(fleet, weights=weights)))

    body = ask(url, {"user_id": "f5", "resultSize": 100, "fusion": name}).json()

    assert [entry["name"] for entry in body["result"]] == list(DEFAULT_NAMES)
    assert body["coverage"] == 1.0
    assert len(body["fused"]) == 100
    fused_from = {source["name"] for item in body["fused"] for source in item["sources"]}
    assert fused_from == {"sml", "asc", "psn"}
    only_trd = {i["id"] for i in rank_items("trd", "f5", 100)} - {
        i["id"] for other in ("sml", "asc", "psn") for i in rank_items(other, "f5", 100)
    }
    assert only_trd and not only_trd & {item["id"] for item in body["fused"]}


def test_weights_shape_rrf_and_coverage_through_the_gateway(fleet: MockFleet, serve: Serve) -> None:
    weights = {"sml": 1.0, "asc": 3.0, "trd": 0.5, "psn": 0.5}
    url = serve(create_app(settings_for(fleet, weights=weights)))
    fleet.set_behaviour("asc", status=503)

    body = ask(url, {"user_id": "f6", "resultSize": 3, "fusion": "rrf"}).json()

    assert body["coverage"] == round(2.0 / 5.0, 4)
    expected: dict[str, float] = {}
    for name in ("sml", "trd", "psn"):
        for rank, item in enumerate(rank_items(name, "f6", 3), start=1):
            expected[item["id"]] = expected.get(item["id"], 0.0) + weights[name] / (60 + rank)
    top = sorted(expected, key=lambda i: -expected[i])[:3]
    assert [item["id"] for item in body["fused"]] == top
    assert [item["score"] for item in body["fused"]] == [round(expected[i], 6) for i in top]


def test_a_fusion_window_fuses_from_deeper_lists_and_returns_result_size(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(settings_for(fleet, fusion_window=30)))

    body = ask(url, {"user_id": "f7", "resultSize": 5}).json()

    seen = fleet.last_request("sml")
    assert seen is not None and seen["body"]["resultSize"] == 30
    assert all(len(entry["prediction"]["items"]) == 30 for entry in body["result"])
    assert len(body["fused"]) == 5
    expected: dict[str, float] = {}
    for name in DEFAULT_NAMES:
        for rank, item in enumerate(rank_items(name, "f7", 30), start=1):
            expected[item["id"]] = expected.get(item["id"], 0.0) + 1 / (60 + rank)
    top = sorted(expected, key=lambda i: (-expected[i], i))[:5]
    assert [item["id"] for item in body["fused"]] == top
    # Items found below rank 5 count: the window is what fusion saw.
    assert any(s["rank"] > 5 for item in body["fused"] for s in item["sources"])


def test_a_fusion_window_never_asks_for_fewer_than_result_size(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(settings_for(fleet, fusion_window=3)))

    body = ask(url, {"user_id": "f8", "resultSize": 8}).json()

    seen = fleet.last_request("psn")
    assert seen is not None and seen["body"]["resultSize"] == 8
    assert len(body["fused"]) == 8


def test_a_requests_fusion_window_overrides_the_configs_and_is_not_forwarded(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(settings_for(fleet, fusion_window=50)))

    narrow = ask(url, {"user_id": "f9", "resultSize": 4, "fusionWindow": 6}).json()
    seen = fleet.last_request("asc")
    wide = ask(url, {"user_id": "f9", "resultSize": 4}).json()
    seen_wide = fleet.last_request("asc")

    assert seen is not None and seen["body"] == {"user_id": "f9", "resultSize": 6}
    assert seen_wide is not None and seen_wide["body"]["resultSize"] == 50
    assert all(len(entry["prediction"]["items"]) == 6 for entry in narrow["result"])
    assert len(narrow["fused"]) == len(wide["fused"]) == 4
    assert max(s["rank"] for item in narrow["fused"] for s in item["sources"]) <= 6


@pytest.mark.parametrize("window", [0, 101, "20", 2.5, True])
def test_a_bad_fusion_window_is_422_naming_the_field(
    fleet: MockFleet, gateway_url: str, window: object
) -> None:
    response = ask(gateway_url, {"fusionWindow": window})

    assert response.status_code == 422
    assert "fusionWindow" in response.json()["error"]["message"]
    assert fleet.stats("sml")["requests"] == 0


def test_an_unknown_fusion_is_422_naming_the_allowed_ones(
    fleet: MockFleet, gateway_url: str
) -> None:
    response = ask(gateway_url, {"fusion": "magic"})

    assert response.status_code == 422
    error = response.json()["error"]
    # The field named (pydantic may add, after a dot, which member of the union it tried),
    # and each allowed name in the message, whatever pydantic's words and quoting around them.
    assert {detail["field"].split(".")[0] for detail in error["details"]} == {"fusion"}
    for name in FUSIONS:
        assert name in error["message"]
    assert fleet.stats("sml")["requests"] == 0
    seen = fleet.last_request("sml")
    assert seen is None


def test_fusion_none_returns_the_answers_without_a_fused_ranking(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(settings_for(fleet, fusion="none")))
    fleet.set_behaviour("psn", status=500)

    by_config = ask(url, {"user_id": "f10"}).json()
    asked_for = ask(url, {"user_id": "f10", "fusion": "rrf"}).json()

    assert (by_config["fusion"], by_config["fused"]) == ("none", [])
    assert by_config["coverage"] == 0.75
    assert [entry["name"] for entry in by_config["result"]] == ["sml", "asc", "trd"]
    assert asked_for["fusion"] == "rrf" and len(asked_for["fused"]) == 10
    assert ask(url, {"fusion": "none"}).json()["fused"] == []


def test_fusion_is_not_forwarded_to_recommenders(fleet: MockFleet, gateway_url: str) -> None:
    ask(gateway_url, {"user_id": "f3", "fusion": "concat"})

    seen = fleet.last_request("asc")
    assert seen is not None and "fusion" not in seen["body"]


@pytest.mark.slow
def test_the_same_request_fuses_the_same_across_calls_and_workers(
    fleet_process: MockFleetProcess,
) -> None:
    names = sorted(FUSIONS)
    fused: dict[str, list[Any]] = {name: [] for name in names}
    with gunicorn(fleet_process, "--workers", "2", GATEWAY_DEADLINE_MS="20000") as server:
        # One request per fusion, asked again and again: the same id seeds the same draw.
        headers = [{"X-Request-ID": f"same-{name}"} for name in names] * 12
        bodies = [{"user_id": "f4", "fusion": name} for name in names] * 12

        def served_by() -> dict[str, set[int]]:
            records = [r for r in lines(server.output()) if r["message"] == "request"]
            return {
                name: {r["process"] for r in records if r["request_id"] == f"same-{name}"}
                for name in names
            }

        # Until both workers have answered each one: which worker accepts is the kernel's call.
        for _ in range(20):
            answers = asyncio.run(post_concurrently(server.url, bodies, headers))
            assert [status for status, _ in answers] == [200] * len(answers)
            for body, (_, answer) in zip(bodies, answers, strict=True):
                fused[body["fusion"]].append(answer["fused"])
            if all(len(pids) == 2 for pids in served_by().values()):
                break
        workers = served_by()

    assert all(len(pids) == 2 for pids in workers.values()), workers
    for name in names:
        assert all(answer == fused[name][0] for answer in fused[name]), name
