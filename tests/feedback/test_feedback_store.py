"""The feedback store contract, run against both stores: SQLite (a file) and a real Redis.

Every test of the contract takes the `store` fixture, once per backend, and asserts the same
values: the two stores must agree to the count. The last tests record from two processes at
once, on one SQLite file and on one Redis server, and check that no update was lost.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.feedback.attribution import PairCounts
from gateway.feedback.impressions import (
    EncodedImpression,
    FeedbackEvent,
    Impression,
    ShownItem,
)
from gateway.feedback.records import (
    ArmCounts,
    EventResult,
    FeedbackStoreError,
    LearnedWeights,
    RecommenderCounts,
)
from gateway.feedback.redis_store import RedisStore
from gateway.feedback.store import FeedbackStore, SQLiteStore, open_store
from tests.helpers import closed_port
from tests.redis_server import DroppingProxy, RedisServer

RETENTION_S = 3600.0
START = 1_700_000_000.0

ACCEPTED, DUPLICATE = EventResult.ACCEPTED, EventResult.DUPLICATE
UNKNOWN, NOT_SHOWN = EventResult.UNKNOWN_REQUEST, EventResult.ITEM_NOT_SHOWN


class FakeClock:
    """A clock the test moves by hand (picklable, for the child processes)."""

    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now


def interleaved(request_id: str, at: float = START, arm: str | None = "B") -> Impression:
    """Six items placed by three teams in turn: i1 als, i2 trd, i3 pop, i4 trd, i5 als, i6 pop."""
    teams = ("als", "trd", "pop", "trd", "als", "pop")
    items = tuple(ShownItem(f"i{n}", n, team, (team,)) for n, team in enumerate(teams, start=1))
    return Impression(request_id, at, arm, items)


def fused(request_id: str, at: float = START, arm: str | None = "A") -> Impression:
    """An RRF answer: i1 from als and ncf, i2 from pop alone."""
    items = (
        ShownItem("i1", 1, None, ("als", "ncf")),
        ShownItem("i2", 2, None, ("pop",)),
    )
    return Impression(request_id, at, arm, items)


def click(request_id: str, item_id: str, event_id: str | None = None) -> FeedbackEvent:
    return FeedbackEvent(request_id, item_id, "click", event_id)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for this module's tests; each test empties its database first."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def fresh_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store's URL: a new SQLite file, or an emptied Redis database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url(0))
    client.flushdb()
    client.close()
    return server.url(0)


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh store of each kind in turn."""
    return fresh_url(request.param, request, tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(url: str, clock: FakeClock) -> Iterator[FeedbackStore]:
    store = open_store(url, RETENTION_S, clock)
    yield store
    store.close()


def test_an_unknown_request_is_told_apart(store: FeedbackStore) -> None:
    store.save_impressions([interleaved("r1")])

    assert store.record([click("nope", "i1")]) == [UNKNOWN]
    assert store.stats().events == {}


def test_an_item_the_answer_did_not_show_is_told_apart(store: FeedbackStore) -> None:
    store.save_impressions([interleaved("r1")])

    assert store.record([click("r1", "i7"), click("r1", "i1")]) == [NOT_SHOWN, ACCEPTED]
    assert store.stats().events == {"click": 1}


def test_an_event_id_counts_once_per_request(store: FeedbackStore) -> None:
    store.save_impressions([interleaved("r1"), interleaved("r2")])

    first = store.record([click("r1", "i1", "e1"), click("r1", "i1", "e1")])
    retried = store.record([click("r1", "i1", "e1"), click("r2", "i1", "e1")])
    no_ids = store.record([click("r1", "i2"), click("r1", "i2")])

    assert first == [ACCEPTED, DUPLICATE]
    assert retried == [DUPLICATE, ACCEPTED]
    assert no_ids == [ACCEPTED, ACCEPTED]
    assert store.stats().recommenders["als"].clicks == 2


def test_a_batch_answers_each_event_in_order(store: FeedbackStore) -> None:
    store.save_impressions([interleaved("r1"), fused("r2")])
    batch = [
        click("r1", "i1", "a"),
        FeedbackEvent("r2", "i1", "purchase", "b"),
        click("gone", "i1"),
        FeedbackEvent("r2", "i9", "dismiss"),
        click("r1", "i1", "a"),
        FeedbackEvent("r2", "i2", "dismiss", "c"),
    ]

    assert store.record(batch) == [ACCEPTED, ACCEPTED, UNKNOWN, NOT_SHOWN, DUPLICATE, ACCEPTED]
    assert store.record([]) == []
    assert store.stats().events == {"click": 1, "dismiss": 1, "purchase": 1}


def test_the_team_draft_example_gives_the_hand_worked_counters(store: FeedbackStore) -> None:
    store.save_impressions([interleaved("imp1"), interleaved("imp2"), interleaved("imp3")])
    # imp1: als 2, trd 1, pop 0 -> als beats trd and pop, trd beats pop.
    # imp2: pop 1 -> pop beats als and trd; als ties trd.  imp3: no clicks, decides nothing.
    results = store.record([click("imp1", "i1"), click("imp2", "i3"), click("imp1", "i4")])
    results += store.record([click("imp1", "i5")])

    stats = store.stats()

    assert results == [ACCEPTED] * 4
    assert stats.pairwise == {
        ("als", "pop"): PairCounts(wins=1, losses=1, ties=0),
        ("als", "trd"): PairCounts(wins=1, losses=0, ties=1),
        ("pop", "trd"): PairCounts(wins=1, losses=1, ties=0),
    }
    assert stats.recommenders == {
        "als": RecommenderCounts(impressions=3, clicks=2, credit=2.0),
        "pop": RecommenderCounts(impressions=3, clicks=1, credit=1.0),
        "trd": RecommenderCounts(impressions=3, clicks=1, credit=1.0),
    }
    assert stats.credit_share("als") == 0.5
    assert stats.arms == {"B": ArmCounts(impressions=3, clicked_impressions=2, clicks=4)}


def test_fused_answers_split_credit_between_sources_and_decide_no_pairs(
    store: FeedbackStore,
) -> None:
    store.save_impressions([fused("r1"), fused("r2", arm=None)])

    store.record([click("r1", "i1"), click("r1", "i2"), click("r2", "i1")])
    stats = store.stats()

    assert stats.pairwise == {}
    # Redis adds credit in long double, SQLite in double: equal to the ninth decimal.
    assert {
        n: (c.impressions, c.clicks, round(c.credit, 9)) for n, c in stats.recommenders.items()
    } == {
        "als": (2, 2, 1.0),
        "ncf": (2, 2, 1.0),
        "pop": (2, 1, 1.0),
    }
    assert stats.arms == {"A": ArmCounts(impressions=1, clicked_impressions=1, clicks=2)}


def test_a_dismiss_is_counted_but_credits_nobody(store: FeedbackStore) -> None:
    store.save_impressions([interleaved("r1")])

    assert store.record([FeedbackEvent("r1", "i1", "dismiss", "d1")]) == [ACCEPTED]
    stats = store.stats()

    assert stats.events == {"dismiss": 1}
    assert stats.recommenders["als"] == RecommenderCounts(impressions=1, clicks=0, credit=0.0)
    assert stats.pairwise == {}
    assert stats.arms["B"] == ArmCounts(impressions=1, clicked_impressions=0, clicks=0)


def test_an_impression_saved_twice_counts_once(store: FeedbackStore) -> None:
    store.save_impressions([interleaved("r1")])
    store.save_impressions([interleaved("r1", arm="other"), interleaved("r2")])
    store.save_impressions([])

    stats = store.stats()

    assert stats.impressions_stored == 2
    assert stats.arms == {"B": ArmCounts(impressions=2)}
    assert stats.recommenders["als"].impressions == 2


def encoded(impression: Impression) -> EncodedImpression:
    """`impression` as the writer thread stores it, from the answer's fused items."""
    items = [
        {
            "id": shown.item_id,
            "score": 0.5,
            "sources": [{"name": name, "rank": rank} for rank, name in enumerate(shown.sources)],
        }
        for shown in impression.items
    ]
    return EncodedImpression.of_answer(
        impression.request_id,
        impression.at,
        impression.arm,
        items,
        [shown.team for shown in impression.items],
    )


def test_an_encoded_answer_is_stored_and_judged_as_its_impression(store: FeedbackStore) -> None:
    store.save_impressions([encoded(interleaved("r1")), encoded(fused("r2"))])
    store.save_impressions([encoded(interleaved("r1", arm="other"))])

    results = store.record([click("r1", "i2"), click("r1", "i9"), click("r2", "i1")])
    stats = store.stats()

    assert results == [ACCEPTED, NOT_SHOWN, ACCEPTED]
    assert stats.impressions_stored == 2
    assert stats.arms == {
        "A": ArmCounts(impressions=1, clicked_impressions=1, clicks=1),
        "B": ArmCounts(impressions=1, clicked_impressions=1, clicks=1),
    }
    assert stats.recommenders["trd"] == RecommenderCounts(impressions=1, clicks=1, credit=1.0)
    assert stats.recommenders["ncf"] == RecommenderCounts(impressions=1, clicks=1, credit=0.5)
    assert stats.pairwise[("pop", "trd")] == PairCounts(wins=0, losses=1, ties=0)


def test_an_expired_impression_is_unknown_and_expire_deletes_it(
    store: FeedbackStore, clock: FakeClock
) -> None:
    store.save_impressions([interleaved("old"), interleaved("new", at=START + 600)])
    clock.now = START + RETENTION_S - 1
    assert store.record([click("old", "i1")]) == [ACCEPTED]

    clock.now = START + RETENTION_S
    assert store.record([click("old", "i2"), click("new", "i2")]) == [UNKNOWN, ACCEPTED]
    # The live count is kept in buckets a thousandth of the retention wide: an impression
    # leaves it when its bucket has outlived the retention, that much later at most.
    clock.now = START + RETENTION_S * 1.001
    assert store.stats().impressions_stored == 1
    assert store.expire() == 1
    assert store.expire() == 0

    stats = store.stats()
    assert store.record([click("old", "i1")]) == [UNKNOWN]
    assert stats.impressions_stored == 1
    # Counters are cumulative: what the expired impression counted stays counted.
    assert stats.recommenders["als"].clicks == 1
    assert stats.recommenders["trd"].clicks == 1


def test_learnt_weights_round_trip_and_the_newest_version_wins(store: FeedbackStore) -> None:
    first = LearnedWeights({"als": 1.25, "pop": 0.5}, evidence=40, updated_at=START, version=1)
    stale = LearnedWeights({"als": 9.0}, evidence=1, updated_at=START + 1, version=1)
    second = LearnedWeights({"als": 1.5, "pop": 0.25}, evidence=80, updated_at=START, version=2)

    assert store.load_weights() is None
    assert store.save_weights(first) is True
    assert store.load_weights() == first
    assert store.save_weights(stale) is False
    assert store.load_weights() == first
    assert store.save_weights(second) is True
    assert store.load_weights() == second


def test_a_closed_store_refuses_to_be_used(store: FeedbackStore) -> None:
    store.close()

    with pytest.raises(RuntimeError, match="closed"):
        store.stats()


def test_threads_of_one_process_share_a_sqlite_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "threads.db", RETENTION_S, FakeClock())
    store.save_impressions([interleaved(f"r{n}") for n in range(50)])

    def clicks(item_id: str) -> None:
        for n in range(50):
            store.record([click(f"r{n}", item_id, f"{item_id}-{n}")])

    threads = [threading.Thread(target=clicks, args=(f"i{k}",)) for k in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = store.stats()
    store.close()

    assert stats.events == {"click": 150}
    assert stats.pairwise == {pair: PairCounts(0, 0, 50) for pair in _PAIRS}


def test_a_batch_of_events_on_hundreds_of_impressions_is_judged_whole(
    store: FeedbackStore,
) -> None:
    store.save_impressions([interleaved(f"r{n}") for n in range(700)])
    batch = [click(f"r{n}", "i1", f"e{n}") for n in range(700)]
    batch += [click("r5", "i1", "e5"), click("nobody", "i1"), click("r699", "i9")]

    results = store.record(batch)

    assert results == [ACCEPTED] * 700 + [DUPLICATE, UNKNOWN, NOT_SHOWN]
    stats = store.stats()
    assert stats.events == {"click": 700}
    assert stats.recommenders["als"].clicks == 700
    assert store.record([click(f"r{n}", "i1", f"e{n}") for n in (0, 350, 699)]) == [DUPLICATE] * 3


def test_an_unreadable_impression_in_sqlite_is_a_store_error_and_counts_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "corrupt.db"
    store = SQLiteStore(path, RETENTION_S, FakeClock())
    store.save_impressions([interleaved("good"), interleaved("bad")])
    with sqlite3.connect(path) as db:
        db.execute("UPDATE impression SET body = '{\"a\": null}' WHERE request_id = 'bad'")

    with pytest.raises(FeedbackStoreError, match="impression 'bad' is unreadable"):
        store.record([click("good", "i1"), click("bad", "i1")])

    assert store.stats().events == {}
    assert store.record([click("good", "i1")]) == [ACCEPTED]
    store.close()


# An interleaved answer's record as versions 1 and 2 of the store wrote it (the first form).
_FIRST_FORM = (
    '{"r":"r1","u":"5f2a","t":1700000000.0,"f":"interleave","a":"B","i":['
    '["i1",1,"als",[["als",1]]],["i2",2,"trd",[["trd",1]]],["i3",3,"pop",[["pop",2]]]]}'
)
_VERSION_1 = (
    "CREATE TABLE impression (request_id TEXT PRIMARY KEY, at REAL NOT NULL, "
    "body TEXT NOT NULL, team_clicks TEXT NOT NULL DEFAULT '{}', "
    "positives INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID; "
    "CREATE INDEX impression_at ON impression (at); PRAGMA user_version = 1;"
)
_VERSION_2 = (
    "CREATE TABLE impression (request_id TEXT NOT NULL UNIQUE, at REAL NOT NULL, "
    "body TEXT NOT NULL, team_clicks TEXT NOT NULL DEFAULT '{}', "
    "positives INTEGER NOT NULL DEFAULT 0); "
    "CREATE INDEX impression_at ON impression (at); PRAGMA user_version = 2;"
)


@pytest.mark.parametrize("schema", [_VERSION_1, _VERSION_2], ids=["version-1", "version-2"])
def test_an_older_sqlite_file_is_converted_keeping_its_impressions(
    tmp_path: Path, schema: str
) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(schema)
    old.execute(
        "INSERT INTO impression (request_id, at, body) VALUES (?, ?, ?)",
        ("r1", START, _FIRST_FORM),
    )
    old.commit()
    old.close()
    store = SQLiteStore(path, RETENTION_S, FakeClock())

    results = store.record([click("r1", "i1"), click("nobody", "i1")])
    store.save_impressions([interleaved("r1", arm="other"), interleaved("r2")])
    again = store.record([click("r1", "i3"), click("r2", "i2")])
    stats = store.stats()
    store.close()
    check = sqlite3.connect(path)
    (version,) = check.execute("PRAGMA user_version").fetchone()
    tables = {name for (name,) in check.execute("SELECT name FROM sqlite_master")}
    check.close()

    assert results == [ACCEPTED, UNKNOWN]
    assert again == [ACCEPTED, ACCEPTED]
    assert stats.impressions_stored == 2
    # r1 was stored before it counted; r2 counts its impression. r1: als and pop clicked, trd
    # not; r2: trd alone.
    assert stats.arms["B"] == ArmCounts(impressions=1, clicked_impressions=2, clicks=3)
    assert stats.pairwise[("als", "trd")] == PairCounts(wins=1, losses=1, ties=0)
    assert stats.pairwise[("als", "pop")] == PairCounts(wins=0, losses=0, ties=2)
    assert version == 3
    assert "impression_1" not in tables
    assert {"impression_at", "stored"} <= tables


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("http://localhost/", "scheme 'http' is not supported"),
        ("feedback.db", "scheme '' is not supported"),
        ("sqlite://host/feedback.db", "has no host"),
        ("sqlite:///", "names no SQLite file"),
        ("sqlite:///dir/", "names no SQLite file"),
        ("sqlite:///f.db?mode=ro", "no query"),
        ("redis:///0", "names no Redis host"),
        ("redis://localhost:port/0", "the port must be a number from 0 to 65535"),
        ("redis://localhost:70000/0", "the port must be a number from 0 to 65535"),
        ("redis://localhost:6379/zero", "must be a number"),
    ],
)
def test_a_url_naming_no_store_is_refused_saying_why(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(bad, RETENTION_S)


def test_sqlite_urls_take_relative_and_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///relative.db", RETENTION_S)
    absolute = open_store(f"sqlite:///{tmp_path / 'absolute.db'}", RETENTION_S)
    for store in (relative, absolute):
        store.save_impressions([interleaved("r1")])
        store.close()

    assert isinstance(relative, SQLiteStore)
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["absolute.db", "relative.db"]


def test_a_store_that_cannot_be_reached_raises_the_store_error(tmp_path: Path) -> None:
    sqlite = SQLiteStore(tmp_path / "missing" / "dir" / "f.db", RETENTION_S)
    with closed_port() as port:
        unreachable = RedisStore(f"redis://127.0.0.1:{port}/0", RETENTION_S, timeout_s=1)

        for store in (sqlite, unreachable):
            with pytest.raises(FeedbackStoreError, match="feedback store") as caught:
                store.stats()
            store.close()
            assert caught.value.__cause__ is not None


# --- Two processes recording at once ---------------------------------------------------------

_PAIRS = [("als", "pop"), ("als", "trd"), ("pop", "trd")]
_PROCESS_IMPRESSIONS = 150


def _record_from_a_process(
    url: str, worker: int, barrier: Any, results: multiprocessing.Queue[dict[str, int]]
) -> None:
    """Child: click team als's (worker 0) or trd's (worker 1) item on every impression, and
    pop's item with an event id both workers send, in batches, all at once with the other."""
    store = open_store(url, RETENTION_S, FakeClock())
    outcomes: collections.Counter[str] = collections.Counter()
    barrier.wait(timeout=60)
    for start in range(0, _PROCESS_IMPRESSIONS, 10):
        batch = []
        for n in range(start, start + 10):
            batch.append(click(f"r{n}", "i1" if worker == 0 else "i2", f"worker{worker}-{n}"))
            batch.append(click(f"r{n}", "i3", f"shared-{n}"))
        outcomes.update(str(result) for result in store.record(batch))
    store.close()
    results.put(dict(outcomes))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_processes_recording_at_once_lose_no_update(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = fresh_url(backend, request, tmp_path)
    store = open_store(url, RETENTION_S, FakeClock())
    store.save_impressions([interleaved(f"r{n}") for n in range(_PROCESS_IMPRESSIONS)])
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results: multiprocessing.Queue[dict[str, int]] = context.Queue()
    children = [
        context.Process(target=_record_from_a_process, args=(url, worker, barrier, results))
        for worker in (0, 1)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=90), results.get(timeout=90)]
    for child in children:
        child.join(timeout=30)
    stats = store.stats()
    store.close()

    n = _PROCESS_IMPRESSIONS
    assert [child.exitcode for child in children] == [0, 0]
    assert sum(o.get("accepted", 0) for o in outcomes) == 3 * n
    assert sum(o.get("duplicate", 0) for o in outcomes) == n
    assert stats.events == {"click": 3 * n}
    assert {name: c.clicks for name, c in stats.recommenders.items()} == dict.fromkeys(
        ("als", "pop", "trd"), n
    )
    # Every impression ends with one click per team: each pair ties once per impression,
    # whatever order the clicks took to get there.
    assert stats.pairwise == {pair: PairCounts(0, 0, n) for pair in _PAIRS}
    assert stats.arms == {"B": ArmCounts(impressions=n, clicked_impressions=n, clicks=3 * n)}


def test_redis_keys_of_an_impression_expire_with_it(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> None:
    url = fresh_url("redis", request, tmp_path)
    store = open_store(url, RETENTION_S, clock)
    store.save_impressions([interleaved("now"), interleaved("older", at=START - 3000)])
    store.record([click("now", "i1", "e1")])
    store.close()
    client = redis.Redis.from_url(url)

    prefix = "fusion-gateway:feedback:"
    ttls = {key: client.ttl(prefix + key) for key in ("s:now", "s:older", "imp:now", "imp:older")}
    client.close()

    assert RETENTION_S - 5 <= ttls["s:now"] <= RETENTION_S
    assert 590 <= ttls["s:older"] <= 600
    # The clicks' hash, made by the first event, lives as long as the impression.
    assert RETENTION_S - 5 <= ttls["imp:now"] <= RETENTION_S
    assert ttls["imp:older"] == -2  # never clicked: no such key


def test_an_sqlite_too_old_for_the_store_is_refused_saying_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    store = SQLiteStore(tmp_path / "old.db", RETENTION_S, FakeClock())

    with pytest.raises(FeedbackStoreError, match=r"needs SQLite 3\.33\.0 or newer.*3\.31\.1"):
        store.save_impressions([interleaved("r1")])


def test_a_redis_store_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url(0), RETENTION_S, FakeClock(), timeout_s=5.0)
        store.save_impressions([interleaved("before")])
        server.restart()  # the pooled connection is now dead, and the scripts are gone

        store.save_impressions([interleaved("after")])
        results = store.record([click("after", "i1", "e1")])
        stats = store.stats()
        store.close()

    assert results == [ACCEPTED]
    assert stats.impressions_stored == 1
    assert stats.events == {"click": 1}


def test_a_stalled_redis_fails_an_operation_within_the_timeout_not_once_per_retry(
    tmp_path: Path,
) -> None:
    timeout_s = 1.0
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url(0), RETENTION_S, FakeClock(), timeout_s=timeout_s)
        store.save_impressions([interleaved("r1")])
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(FeedbackStoreError, match="Timeout"):
                store.record([click("r1", "i1", "e1")])
            took = time.monotonic() - started
        finally:
            os.kill(server.pid, signal.SIGCONT)
        store.close()

    # One timeout: a timeout is not retried, or a stalled server would hold the caller for
    # one timeout per retry, past the store's time limit.
    assert took < 1.9 * timeout_s


@pytest.mark.parametrize("lose", ["request", "reply"])
def test_a_redis_connection_dropped_mid_command_is_replaced_and_counts_once(
    tmp_path: Path, lose: str
) -> None:
    with RedisServer(tmp_path) as server:
        direct = RedisStore(server.url(0), RETENTION_S, FakeClock())
        direct.save_impressions([interleaved("r1")])
        assert direct.record([click("nobody", "i1")]) == [UNKNOWN]  # the script is loaded
        with DroppingProxy(server.port, b"EVALSHA", lose) as proxy:
            store = RedisStore(proxy.url(0), RETENTION_S, FakeClock())
            results = store.record([click("r1", "i1", "e1"), click("r1", "i2", "e2")])
            store.close()
        stats = direct.stats()
        direct.close()

    assert proxy.dropped
    # Sent again on a new connection: if the first ran, its events are known by their ids.
    assert results == ([ACCEPTED] * 2 if lose == "request" else [DUPLICATE] * 2)
    assert stats.events == {"click": 2}
    assert stats.recommenders["als"].clicks == 1


def test_redis_keys_of_the_first_layout_are_still_judged_counted_and_expired(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> None:
    url = fresh_url("redis", request, tmp_path)
    client = redis.Redis.from_url(url)
    prefix = "fusion-gateway:feedback:"
    client.hset(prefix + "imp:r1", "json", _FIRST_FORM)
    client.zadd(prefix + "index", {"r1": START})
    client.close()
    store = open_store(url, RETENTION_S, clock)
    store.save_impressions([interleaved("r2", at=START + 60)])

    results = store.record([click("r1", "i1"), click("r1", "i9"), click("r2", "i1")])
    stored = store.stats().impressions_stored
    clock.now = START + RETENTION_S + 30
    late = store.record([click("r1", "i2"), click("r2", "i2")])
    expired = store.expire()
    after = store.stats()
    store.close()

    assert results == [ACCEPTED, NOT_SHOWN, ACCEPTED]
    assert stored == 2
    assert late == [UNKNOWN, ACCEPTED]
    assert expired == 1
    assert after.impressions_stored == 1
    assert after.arms["B"] == ArmCounts(impressions=1, clicked_impressions=2, clicks=3)
