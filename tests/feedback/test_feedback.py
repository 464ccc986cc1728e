"""Tests of `gateway.feedback.service.FeedbackService`: arms, the bounded writer, judging, learning.

Over a real SQLite file, without HTTP: the endpoints are tests/web/test_feedback_routes.py's.
"""

from __future__ import annotations

import collections
import contextlib
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.config.feedback import FeedbackSettings
from gateway.core.fusion import FusedRanking
from gateway.feedback.attribution import wilson_interval
from gateway.feedback.impressions import FeedbackEvent, hash_user
from gateway.feedback.records import EventResult
from gateway.feedback.service import FeedbackService
from gateway.feedback.store import SQLiteStore
from gateway.observability import metrics
from tests.helpers import sample

SALT = "test-salt"
WEIGHTS = {"sml": 1.0, "asc": 1.0, "trd": 1.0, "psn": 0.0}


def feedback_settings(tmp_path: Path, **fields: Any) -> FeedbackSettings:
    return FeedbackSettings.model_validate(
        {"store": f"sqlite:///{tmp_path / 'feedback.db'}", "salt": SALT, **fields}
    )


@pytest.fixture
def sleeps() -> list[float]:
    return []


def recorder(waits: list[float]) -> Callable[[float], Awaitable[None]]:
    """An `async_sleep` that keeps what it was asked to wait, and does not wait."""

    async def wait(seconds: float) -> None:
        waits.append(seconds)

    return wait


@pytest.fixture
def service(tmp_path: Path, sleeps: list[float]) -> Iterator[FeedbackService]:
    """A service whose writer thread is not started: the test flushes by hand."""
    arms = [
        {"name": "control", "fusion": "rrf", "share": 3},
        {"name": "explore", "fusion": "interleave", "share": 1},
        {"name": "tuned", "fusion": "rrf", "share": 1e-9, "weights": {"sml": 2.0}},
    ]
    service = FeedbackService(
        feedback_settings(tmp_path, queue_limit=3, experiments={"arms": arms}),
        WEIGHTS,
        async_sleep=recorder(sleeps),
    )
    yield service
    service.close()


def ranking(*ids: str, fusion: str = "rrf") -> FusedRanking:
    items = [
        {"id": item_id, "score": 1.0, "sources": [{"name": "sml", "rank": rank}]}
        for rank, item_id in enumerate(ids, start=1)
    ]
    teams = tuple("sml" if fusion == "interleave" else None for _ in ids)
    return FusedRanking(fusion, items, 1.0, teams)  # type: ignore[arg-type]


def test_users_split_by_share_stick_to_their_arm_and_explicit_fusions_stay_out(
    service: FeedbackService,
) -> None:
    arms = collections.Counter(service.assign(f"user-{n}", None).arm for n in range(20_000))

    assert abs(arms["control"] / 20_000 - 0.75) < 0.02
    assert abs(arms["explore"] / 20_000 - 0.25) < 0.02
    assert service.assign("user-7", None) == service.assign("user-7", None)
    users = (f"user-{n}" for n in range(100))
    explore = next(user for user in users if service.assign(user, None).arm == "explore")
    assignment = service.assign(explore, None)
    assert assignment.fusion == "interleave"
    assert assignment.user_hash == hash_user(explore, SALT)
    # A request that names its fusion, or has no user, is outside the experiment.
    assert service.assign(explore, "concat").arm is None
    assert service.assign(explore, "concat").fusion == "concat"
    assert service.assign(None, None).arm is None


def test_learned_arms_start_from_a_prior_or_from_the_configured_weights(
    tmp_path: Path,
) -> None:
    arms = [{"name": "only", "fusion": "rrf", "share": 1, "weights": "learned"}]
    settings = feedback_settings(tmp_path, experiments={"arms": arms})
    equal = FeedbackService(settings, WEIGHTS)
    configured = FeedbackService(settings, {**WEIGHTS, "asc": 2.0})
    try:
        # Equal weights say nothing: they hold until the evidence shows a leader (then served
        # alone until min_evidence). Shadow recommenders (weight 0) are not learnt: they stay
        # out of the fusion.
        assert equal.assign("u1", None).weights == {"sml": 1.0, "asc": 1.0, "trd": 1.0}
        # Weights that differ are a prior: learning starts from them.
        assert configured.assign("u1", None).weights == {"sml": 1.0, "asc": 2.0, "trd": 1.0}
    finally:
        equal.close()
        configured.close()


async def test_a_full_queue_drops_impressions_and_counts_them(service: FeedbackService) -> None:
    impressions = "gateway_feedback_impressions_total"
    before = sample(metrics.render().decode(), impressions, outcome="dropped")

    for n in range(5):
        service.record(f"r{n}", service.assign("u1", None), ranking("i1", "i2"))
    service.flush()

    rendered = metrics.render().decode()
    dropped = sample(rendered, impressions, outcome="dropped")
    assert dropped - before == 2
    results = await service.judge([FeedbackEvent(f"r{n}", "i1", "click") for n in range(5)])
    assert results[:3] == [EventResult.ACCEPTED] * 3
    assert results[3:] == [EventResult.UNKNOWN_REQUEST] * 2


def test_nothing_is_recorded_for_an_answer_without_fused_items(service: FeedbackService) -> None:
    service.record("none", service.assign("u1", "none"), FusedRanking("none", [], 1.0))
    service.record("empty", service.assign("u1", None), ranking())
    service.flush()

    assert service.report()["impressions_stored"] == 0


async def test_an_event_before_its_impression_is_written_is_judged_after_it(
    service: FeedbackService, sleeps: list[float]
) -> None:
    service.record("r1", service.assign("u1", None), ranking("i1"))

    # Waiting in this worker: written first, then judged.
    assert await service.judge([FeedbackEvent("r1", "i1", "click")]) == [EventResult.ACCEPTED]
    assert sleeps == []
    # Unknown: judged once more after two flush intervals (another worker may write it).
    assert await service.judge([FeedbackEvent("r2", "i1", "click")]) == [
        EventResult.UNKNOWN_REQUEST
    ]
    assert sleeps == [pytest.approx(0.2)]


async def test_judged_on_the_loop_the_events_go_to_the_event_thread_and_unknowns_wait_there(
    tmp_path: Path,
) -> None:
    """`judge`: the events go to the event thread, the retry's wait is awaited, not slept."""
    waits: list[float] = []

    async def wait(seconds: float) -> None:
        waits.append(seconds)
        # Meanwhile another worker writes the impression the event named.
        feedback.record("late", feedback.assign("u2", None), ranking("i1"))

    feedback = FeedbackService(feedback_settings(tmp_path), WEIGHTS, async_sleep=wait)
    try:
        feedback.record("r1", feedback.assign("u1", None), ranking("i1", "i2"))
        first = FeedbackEvent("r1", "i1", "click", "e-1")

        assert await feedback.judge([first, FeedbackEvent("r1", "i9", "click")]) == [
            EventResult.ACCEPTED,
            EventResult.ITEM_NOT_SHOWN,
        ]
        assert waits == []
        again = [first, FeedbackEvent("late", "i1", "click")]
        assert await feedback.judge(again) == [EventResult.DUPLICATE, EventResult.ACCEPTED]
        assert waits == [pytest.approx(0.2)]
        assert feedback.events.groups == 3  # the first request, the second, its retry
        assert feedback.report()["events"]["click"] == 2
    finally:
        feedback.close()


def test_the_store_holds_no_user_neither_the_id_nor_its_pseudonym(
    service: FeedbackService, tmp_path: Path
) -> None:
    service.record("r1", service.assign("alice@example.com", None), ranking("i1"))
    service.flush()
    service.close()

    stored = b"".join(path.read_bytes() for path in tmp_path.glob("feedback.db*"))
    assert b"alice@example.com" not in stored
    assert hash_user("alice@example.com", SALT).encode() not in stored


async def test_the_learner_publishes_weights_and_a_frozen_one_holds_them(tmp_path: Path) -> None:
    learner = {"min_evidence": 2, "beta": 3.0, "prior": 3.0, "floor": 0.1, "max_weight": 5.0}
    service = FeedbackService(feedback_settings(tmp_path, learner=learner), WEIGHTS)
    frozen = FeedbackService(
        feedback_settings(tmp_path, learner={**learner, "frozen": True}), WEIGHTS
    )
    try:
        # sml beats asc and trd on each of three interleaved answers.
        for n in range(3):
            fused = FusedRanking(
                "interleave",
                [{"id": f"i{k}", "score": 1.0, "sources": []} for k in range(3)],
                1.0,
                ("sml", "asc", "trd"),
            )
            service.record(f"r{n}", service.assign("u1", "interleave"), fused)
        service.flush()
        await service.judge([FeedbackEvent(f"r{n}", "i0", "click") for n in range(3)])

        learned = service.learn()
        held = frozen.learn()
    finally:
        service.close()
        frozen.close()

    # sml won 6 of 6, asc and trd lost 3 of 3: margins 6/9 and -3/6 with prior 3;
    # w = exp(3 * margin), clipped to [0.1, 5].
    assert learned.weights == {"sml": 5.0, "asc": pytest.approx(0.223130), "trd": 0.223130}
    assert learned.version == 1
    assert service.weights_in_use() == learned.weights
    # The frozen one keeps what the store has (the first's), and does not move it.
    assert held == learned
    store = SQLiteStore(tmp_path / "feedback.db", 3600)
    try:
        assert store.load_weights() == learned
    finally:
        store.close()


def test_the_report_is_read_again_once_its_refresh_has_passed(tmp_path: Path) -> None:
    now = [100.0]
    settings = FeedbackSettings(
        store=f"sqlite:///{tmp_path / 'f.db'}", salt="s", report_refresh_ms=500
    )
    service = FeedbackService(settings, {"a": 1.0, "b": 1.0}, monotonic=lambda: now[0])
    reads: list[int] = []
    store = service._require_store()
    stats = store.stats

    def counted_stats() -> Any:
        reads.append(1)
        return stats()

    store.stats = counted_stats  # type: ignore[method-assign]
    try:
        first = service.report()
        now[0] += 0.499
        assert service.report() is first and len(reads) == 1
        now[0] += 0.002
        assert service.report() is not first and len(reads) == 2
    finally:
        service.close()


@contextlib.contextmanager
def write_lock(database: Path) -> Iterator[None]:
    """SQLite's write lock on `database`, held by another connection."""
    holder = sqlite3.connect(database, isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


def held_service(tmp_path: Path, **fields: Any) -> FeedbackService:
    """A service holding 3 impressions unwritten (its writer not started), its store made."""
    service = FeedbackService(feedback_settings(tmp_path, store_timeout_ms=100, **fields), WEIGHTS)
    service.report()  # the file and its schema exist
    for n in range(3):
        service.record(f"r{n}", service.assign("u1", None), ranking("i1", "i2"))
    return service


def test_a_graceful_stop_writes_what_is_held_once_the_store_frees(tmp_path: Path) -> None:
    service = held_service(tmp_path, stop_within_ms=5000)
    with ThreadPoolExecutor(1) as pool:
        with write_lock(tmp_path / "feedback.db"):
            closing = pool.submit(service.close)
            time.sleep(0.5)  # the first tries meet the lock
            assert not closing.done()
        closing.result(timeout=30)  # the lock is free: the next try writes them

    store = SQLiteStore(tmp_path / "feedback.db", retention_s=3600)
    try:
        assert store.stats().impressions_stored == 3
    finally:
        store.close()


def test_a_graceful_stop_says_how_many_it_could_not_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = held_service(tmp_path, stop_within_ms=300)
    dropped = "gateway_feedback_impressions_total"
    before = sample(metrics.render().decode(), dropped, outcome="dropped")

    with write_lock(tmp_path / "feedback.db"):
        started = time.monotonic()
        service.close()
        took = time.monotonic() - started

    assert took < 10  # bounded: its 0.3 s of tries and the store's timeouts, not forever
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("3 impressions could not be written before the worker stopped" in m for m in said)
    assert sample(metrics.render().decode(), dropped, outcome="dropped") == before + 3


async def test_learning_starts_from_the_start_weights_and_explores_again_when_evidence_contradicts(
    tmp_path: Path,
) -> None:
    arms = [
        {"name": "explore", "fusion": "interleave", "share": 1, "explore": True, "min_share": 0.05},
        {"name": "learned", "fusion": "rrf", "share": 1, "weights": "learned"},
    ]
    learner = {"min_evidence": 10_000, "start_weights": {"asc": 2.5, "sml": 0.5}}
    service = FeedbackService(
        feedback_settings(tmp_path, experiments={"arms": arms}, learner=learner), WEIGHTS
    )
    try:
        before = service.shares()
        start = dict(service.weights_in_use())
        report_before = service.report()
        # sml and asc and trd each shown on 20 interleaved answers, sml clicked on each: every
        # pair is decided 20 times or tied.
        teams = ("sml", "asc", "trd")
        for n in range(20):
            items = [{"id": f"i{k}", "score": 1.0, "sources": []} for k in range(3)]
            answer = FusedRanking("interleave", items, 1.0, teams)
            service.record(f"r{n}", service.assign("u1", "interleave"), answer)
        service.flush()
        await service.judge([FeedbackEvent(f"r{n}", "i0", "click") for n in range(20)])
        service.learn()
        after = service.shares()
        users = collections.Counter(service.assign(f"user-{n}", None).arm for n in range(4000))
        report = service._fresh_report()
    finally:
        service.close()

    # The prior: where learning starts, before any evidence (trd keeps its configured 1.0).
    assert start == {"sml": 0.5, "asc": 2.5, "trd": 1.0}
    assert report_before["weights"]["prior"] == {
        "from": "start_weights",
        "strength": 1000.0,
        "agreement": {"agree": 0, "disagree": 0},
        "contradicted": False,
    }
    # Informed (start_weights), the start is worth `start_strength` (1,000) comparisons to
    # exploration too, 500 clicked answers (one click decides k - 1 = 2 comparisons for its
    # team), each recommender at the share its start stands for: (1 + ln(w / g) / beta) / 2, g
    # the weights' geometric mean. trd's, nearest one half, is the widest; exploration starts
    # at its least.
    centre = math.log(0.5 * 2.5 * 1.0) / 3
    share = {name: (1 + (math.log(w) - centre) / 4) / 2 for name, w in start.items()}
    low, high = wilson_interval(500 * share["trd"], 500)
    assert report_before["exploration"]["uncertainty"] == pytest.approx((high - low) / 2, abs=1e-6)
    assert before == {"explore": pytest.approx(0.05 / 1.05), "learned": pytest.approx(1 / 1.05)}
    # sml, which the start ranks below asc and trd, won its 40 comparisons (20 answers): the
    # evidence contradicts the start, which is now worth `prior` (50) comparisons only. asc
    # and trd lost their 20 (10 answers; they tied each other): asc's, 25 answers at its
    # start's share of 35, is the widest interval, and exploration rises from its least.
    prior = report["weights"]["prior"]
    # sml's wins over asc and trd (2.5 and 1.0 to its 0.5) disagree with the start's order;
    # asc's and trd's ties say nothing.
    assert prior == {
        "from": "start_weights",
        "strength": 50.0,
        "agreement": {"agree": 0, "disagree": 40},
        "contradicted": True,
    }
    low, high = wilson_interval(25 * share["asc"], 35)
    assert report["exploration"]["uncertainty"] == pytest.approx((high - low) / 2, abs=1e-6)
    wider = ((high - low) / 2 / 0.5) ** 2
    assert wider > 0.05
    assert after == {
        "explore": pytest.approx(wider / (1 + wider)),
        "learned": pytest.approx(1 / (1 + wider)),
    }
    assert users["explore"] / 4000 == pytest.approx(wider / (1 + wider), abs=0.02)
    assert report["served"]["impressions"] == 0  # nobody was in an arm: fusion was named


async def test_an_exploring_arms_share_falls_as_the_square_of_the_widest_interval(
    tmp_path: Path,
) -> None:
    arms = [
        {"name": "explore", "fusion": "interleave", "share": 1, "explore": True}
        | {"min_share": 0.001},
        {"name": "learned", "fusion": "rrf", "share": 1, "weights": "learned"},
    ]
    weights = {"sml": 1.0, "asc": 1.0}
    service = FeedbackService(feedback_settings(tmp_path, experiments={"arms": arms}), weights)
    try:
        for n in range(100):
            items = [{"id": f"i{k}", "score": 1.0, "sources": []} for k in range(2)]
            answer = FusedRanking("interleave", items, 1.0, ("sml", "asc"))
            service.record(f"r{n}", service.assign("u1", "interleave"), answer)
        service.flush()
        # sml wins 75 of 100 decided comparisons.
        clicks = [FeedbackEvent(f"r{n}", "i0" if n < 75 else "i1", "click") for n in range(100)]
        await service.judge(clicks)
        service.learn()
        shares = service.shares()
        users = collections.Counter(service.assign(f"user-{n}", None).arm for n in range(4000))
        report = service._fresh_report()
    finally:
        service.close()

    low, high = wilson_interval(75, 100)  # sml's 75 of 100; asc's 25 of 100, as wide
    widest = (high - low) / 2  # about 0.085
    assert report["exploration"]["uncertainty"] == pytest.approx(widest, abs=1e-6)
    explore = (widest / 0.5) ** 2  # about 0.03: the variance's fall, not the width's
    assert shares["explore"] == pytest.approx(explore / (explore + 1), rel=0.01)
    assert report["arms"]["explore"]["share_now"] == pytest.approx(shares["explore"], abs=1e-6)
    assert report["exploration"]["share_now"] == pytest.approx(shares["explore"], abs=1e-6)
    # The users follow the shares now (sticky to a point of their hash, not to an arm).
    assert users["explore"] / 4000 == pytest.approx(shares["explore"], abs=0.03)
