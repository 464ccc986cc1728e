"""The feedback store in one SQLite file, shared by the worker processes of one host.

Blocking by design: the gateway calls it from a writer thread, never on its event loop. Each
thread that uses a store gets a connection of its own; every change is one `BEGIN IMMEDIATE`
transaction (the write lock taken up front, so two processes never both read and then both
write), in WAL mode (readers never wait for the writer) with a busy timeout (a writer waits
for another process's transaction instead of failing).

Schema (`PRAGMA user_version` 3)::

    impression(rowid, request_id UNIQUE, at, body, team_clicks, positives)
        body: the impression's record (`gateway.feedback.impressions`: compact JSON, no user);
        team_clicks: {team: credited clicks} so far, NULL before any; positives: positive
        events so far
    stored(bucket, count)                      impressions saved, by time bucket (ms)
    seen_event(request_id, event_id)           event ids accepted, for duplicates
    counter(scope, name, field, value)         ("recommender", name, impressions|clicks|credit),
                                               ("arm", arm, impressions|clicked_impressions|
                                               clicks), ("event", kind, "count")
    pair(a, b, wins, losses, ties)             a < b, from a's side
    learned_weights(id = 1, version, body)     LearnedWeights JSON, highest version kept

Impressions are kept in a rowid table, in the order written, with `request_id` in an index of
its own: a batch appends its rows to the table's last pages and puts only the short keys at
random places (version 1 keyed the table by the random request id, so every insert rewrote a
page of full rows). Version 3 added `stored`: counting the live impressions is a sum over at
most a thousand buckets (a thousandth of the retention each) instead of a scan of a week's
rows. A file of an older version is converted when the store first opens it; version 2's
records, in the older impression form, are read as they are.

An impression is live while `now - at < retention_s` by the injected clock; `expire` deletes
the others, a slice at a time (each slice its own transaction, so writers wait for one slice,
not for a backlog), and until then `record` already treats them as unknown. The stored count
counts a bucket until its last moment has outlived the retention, so it may count an impression
up to a thousandth of the retention longer. Counters are cumulative: expiring an impression
does not take back what its events counted.
"""

from __future__ import annotations

import collections
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pydantic_core

from gateway.feedback.attribution import PairCounts, pairwise_delta
from gateway.feedback.impressions import (
    POSITIVE_EVENTS,
    FeedbackEvent,
    ShownItems,
    StorableImpression,
    credit_for,
)
from gateway.feedback.records import (
    ArmCounts,
    EventResult,
    FeedbackStats,
    FeedbackStoreError,
    LearnedWeights,
    RecommenderCounts,
    store_errors,
)

__all__ = ["SQLiteStore"]

_SCHEMA_VERSION = 3
_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS impression (
    request_id TEXT NOT NULL UNIQUE,
    at REAL NOT NULL,
    body TEXT NOT NULL,
    team_clicks TEXT,
    positives INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS impression_at ON impression (at);
CREATE TABLE IF NOT EXISTS stored (
    bucket INTEGER PRIMARY KEY,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_event (
    request_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (request_id, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counter (
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    field TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (scope, name, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pair (
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    wins INTEGER NOT NULL,
    losses INTEGER NOT NULL,
    ties INTEGER NOT NULL,
    PRIMARY KEY (a, b)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS learned_weights (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    body TEXT NOT NULL
);
"""
_SCHEMA = tuple(part.strip() for part in _SCHEMA_SQL.split(";") if part.strip())
# Version 1 to 2: the impressions move from a table keyed by request id to a rowid table.
_BEFORE_SCHEMA_FROM_1 = (
    "DROP INDEX IF EXISTS impression_at",
    "ALTER TABLE impression RENAME TO impression_1",
)
_AFTER_SCHEMA_FROM_1 = (
    "INSERT OR IGNORE INTO impression (request_id, at, body, team_clicks, positives) "
    "SELECT request_id, at, body, team_clicks, positives FROM impression_1 ORDER BY at",
    "DROP TABLE impression_1",
)


# A batch's rows go to SQLite as one JSON array parameter, and what is read comes back as one
# JSON array: one statement, one step, whatever the batch's size. Under `executemany` or a
# cursor every row is a step of its own, and each step lets go of the GIL and must win it back
# from the worker's busy event loop: measured with one event per request, that cost the
# worker about a tenth more CPU per event than the statements themselves.
def _rows(*names: str) -> str:
    """The rows of a JSON array of arrays (the statement's `?`), their items as columns."""
    columns = ", ".join(f"json_extract(value, '$[{i}]') AS {name}" for i, name in enumerate(names))
    return f"SELECT {columns} FROM json_each(?)"


# The live impressions' count, by bucket: a bucket is the milliseconds of its start.
_COUNT = (
    "INSERT INTO stored (bucket, count) " + _rows("b", "c") + " WHERE true "
    "ON CONFLICT (bucket) DO UPDATE SET count = count + excluded.count"
)
# Version 2 to 3: the buckets of the impressions already stored.
_COUNT_STORED = (
    "INSERT INTO stored (bucket, count) SELECT CAST(at * 1000 AS INTEGER) / ? * ?, COUNT(*) "
    "FROM impression WHERE true GROUP BY 1 "
    "ON CONFLICT (bucket) DO UPDATE SET count = count + excluded.count"
)
# How many impressions one `expire` transaction deletes.
_EXPIRE_SLICE = 5000
_EXPIRE_IDS = "SELECT request_id FROM impression WHERE at <= ? ORDER BY at, rowid LIMIT ?"
_EXPIRE_ROWS = "SELECT rowid FROM impression WHERE at <= ? ORDER BY at, rowid LIMIT ?"
# A thousand buckets over the retention: the count is that exact, and that cheap.
_BUCKETS = 1000

_INSERT = "INSERT OR IGNORE INTO impression (request_id, at, body) VALUES (?, ?, ?)"
_INSERT_ALL = "INSERT OR IGNORE INTO impression (request_id, at, body) " + _rows("r", "t", "b")
# (`WHERE true` tells SQLite's parser that ON CONFLICT is the upsert, not a join's.)
_ADD = (
    f"INSERT INTO counter (scope, name, field, value) {_rows('s', 'n', 'f', 'v')} WHERE true "
    "ON CONFLICT (scope, name, field) DO UPDATE SET value = value + excluded.value"
)
_ADD_PAIR = (
    f"INSERT INTO pair (a, b, wins, losses, ties) {_rows('a', 'b', 'w', 'l', 't')} WHERE true "
    "ON CONFLICT (a, b) DO UPDATE SET wins = wins + excluded.wins, "
    "losses = losses + excluded.losses, ties = ties + excluded.ties"
)
_ADD_SEEN = "INSERT INTO seen_event (request_id, event_id) " + _rows("r", "e")
_CLICKED = (
    "UPDATE impression SET team_clicks = clicked.c, positives = clicked.p "
    f"FROM ({_rows('r', 'c', 'p')}) AS clicked WHERE impression.request_id = clicked.r"
)
_LIVE = (
    "SELECT json_group_array(json_array(request_id, body, team_clicks, positives)) "
    "FROM impression WHERE at > ? AND request_id IN (SELECT value FROM json_each(?))"
)
_SEEN = (
    "SELECT json_group_array(json_array(request_id, event_id)) FROM seen_event "
    "WHERE request_id IN (SELECT value FROM json_each(?))"
)
# UPDATE ... FROM came in SQLite 3.33; json_each is built in from 3.38, and in most builds
# before (JSON1).
_SQLITE_NEEDED = (3, 33, 0)


class _Added(NamedTuple):
    """What a batch of events adds to the counters and the pairs, written at its end."""

    counters: collections.defaultdict[tuple[str, str, str], float]
    pairs: dict[tuple[str, str], PairCounts]


def _plus(total: PairCounts | None, change: PairCounts) -> PairCounts:
    if total is None:
        return change
    return PairCounts(total[0] + change[0], total[1] + change[1], total[2] + change[2])


def _translated() -> contextlib.AbstractContextManager[None]:
    return store_errors(sqlite3.Error, "SQLite")


# SQLite's words for a connection worth replacing (its result codes are not exposed before
# Python 3.11's `sqlite_errorname`, and are the same words there).
_REOPEN_ON = ("readonly", "read-only", "disk i/o", "locked", "unable to open", "not a database")


def _heals_by_reopening(exc: sqlite3.Error) -> bool:
    name = (getattr(exc, "sqlite_errorname", "") or "").lower()
    text = f"{name} {exc}".lower()
    return any(words in text for words in _REOPEN_ON)


class SQLiteStore:
    """The feedback store in the SQLite file at `path`; see the module docstring.

    Make one per worker process, after gunicorn forks (as the HTTP session is): a SQLite
    connection must not cross a fork.
    """

    def __init__(
        self,
        path: str | Path,
        retention_s: float,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
    ):
        if retention_s <= 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        self.path = Path(path)
        self.retention_s = retention_s
        # A bucket of the stored count is a thousandth of the retention, in whole ms.
        self._bucket_ms = max(1, round(retention_s * 1000 / _BUCKETS))
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        # Reentrant: a schema made under it may fail, and its connection be dropped under it.
        self._lock = threading.RLock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        self._schema_ready = False

    def save_impressions(self, impressions: Sequence[StorableImpression]) -> None:
        """Store a batch in one transaction; a request id already stored keeps its first."""
        if not impressions:
            return
        firsts: dict[str, StorableImpression] = {}
        for impression in impressions:
            firsts.setdefault(impression.request_id, impression)
        batch = list(firsts.values())
        rows = [(imp.request_id, imp.at, imp.to_json()) for imp in batch]
        with self._transaction() as db:
            # One statement for the batch. If a request id was stored before (a client reusing
            # one, rare) the batch is undone and inserted row by row, to count only the new.
            db.execute("SAVEPOINT batch")
            if _write(db, _INSERT_ALL, rows) != len(rows):
                db.execute("ROLLBACK TO batch")
                batch = [
                    imp
                    for imp, row in zip(batch, rows, strict=True)
                    if db.execute(_INSERT, row).rowcount
                ]
            db.execute("RELEASE batch")
            # One upsert per counter for the whole batch, not one per impression and name;
            # a batch's impressions mostly share one set of recommenders, counted once.
            shown = collections.Counter(impression.recommenders() for impression in batch)
            added: collections.Counter[tuple[str, str]] = collections.Counter()
            for names, count in shown.items():
                for name in names:
                    added["recommender", name] += count
            added.update(("arm", imp.arm) for imp in batch if imp.arm is not None)
            _write(
                db,
                _ADD,
                [(scope, name, "impressions", count) for (scope, name), count in added.items()],
            )
            buckets = collections.Counter(self._bucket(imp.at) for imp in batch)
            _write(db, _COUNT, list(buckets.items()))

    def record(self, events: Sequence[FeedbackEvent]) -> list[EventResult]:
        """Judge and count a batch of events in one transaction, in order; one result each.

        A handful of statements per batch, whatever its size: the live impressions the events
        name are read in one query (and their JSON parsed once each), the event ids already
        seen in another; the events are judged in order in memory; then the impressions that
        were clicked, the new event ids and the counters are written once each. Nothing else
        writes them meanwhile: the transaction holds the write lock from its start.
        """
        if not events:
            return []
        cutoff = self._clock() - self.retention_s
        added = _Added(collections.defaultdict(float), {})
        with self._transaction() as db:
            live = _read_live(db, {event.request_id for event in events}, cutoff)
            with_ids = {e.request_id for e in events if e.event_id is not None} & live.keys()
            seen = _read_seen(db, with_ids) if with_ids else set()
            new_seen: list[tuple[str, str]] = []
            results = [_judge(event, live, seen, new_seen, added) for event in events]
            clicked = [
                (rid, _json(one.team_clicks), one.positives)
                for rid, one in live.items()
                if one.changed
            ]
            _write(db, _ADD_SEEN, new_seen)
            _write(db, _CLICKED, clicked)
            _write(db, _ADD, [(*key, value) for key, value in added.counters.items()])
            _write(db, _ADD_PAIR, [(a, b, *change) for (a, b), change in added.pairs.items()])
        return results

    def stats(self) -> FeedbackStats:
        """Every counter, read in one transaction."""
        cutoff = self._clock() - self.retention_s
        db = self._connection()
        with _translated(), self._healing(db):
            db.execute("BEGIN")
            try:
                counters = db.execute("SELECT scope, name, field, value FROM counter").fetchall()
                pairs = db.execute("SELECT a, b, wins, losses, ties FROM pair").fetchall()
                (stored,) = db.execute(
                    "SELECT COALESCE(SUM(count), 0) FROM stored WHERE bucket > ?",
                    (self._bucket(cutoff) - self._bucket_ms,),
                ).fetchone()
            finally:
                db.execute("COMMIT")
        fields: dict[tuple[str, str], dict[str, float]] = {}
        for scope, name, field, value in counters:
            fields.setdefault((scope, name), {})[field] = value
        return FeedbackStats(
            recommenders={
                name: RecommenderCounts(
                    int(f.get("impressions", 0)), int(f.get("clicks", 0)), f.get("credit", 0.0)
                )
                for (scope, name), f in sorted(fields.items())
                if scope == "recommender"
            },
            pairwise={(a, b): PairCounts(w, lo, t) for a, b, w, lo, t in sorted(pairs)},
            arms={
                name: ArmCounts(
                    int(f.get("impressions", 0)),
                    int(f.get("clicked_impressions", 0)),
                    int(f.get("clicks", 0)),
                )
                for (scope, name), f in sorted(fields.items())
                if scope == "arm"
            },
            events={
                name: int(f["count"])
                for (scope, name), f in sorted(fields.items())
                if scope == "event"
            },
            impressions_stored=stored,
        )

    def expire(self) -> int:
        """Delete the impressions older than the retention; how many were deleted.

        A slice at a time, each in its own transaction: another process's writes wait for
        one slice, however many impressions a long pause left behind.
        """
        cutoff = self._clock() - self.retention_s
        deleted = 0
        while True:
            with self._transaction() as db:
                db.execute(
                    f"DELETE FROM seen_event WHERE request_id IN ({_EXPIRE_IDS})",
                    (cutoff, _EXPIRE_SLICE),
                )
                rows = db.execute(
                    f"DELETE FROM impression WHERE rowid IN ({_EXPIRE_ROWS})",
                    (cutoff, _EXPIRE_SLICE),
                ).rowcount
                if rows < _EXPIRE_SLICE:
                    db.execute(
                        "DELETE FROM stored WHERE bucket <= ?",
                        (self._bucket(cutoff) - self._bucket_ms,),
                    )
            deleted += rows
            if rows < _EXPIRE_SLICE:
                return deleted

    def load_weights(self) -> LearnedWeights | None:
        """The learnt weights saved last, or None before any."""
        db = self._connection()
        with _translated(), self._healing(db):
            row = db.execute("SELECT body FROM learned_weights WHERE id = 1").fetchone()
        return None if row is None else LearnedWeights.from_json(row[0])

    def save_weights(self, weights: LearnedWeights) -> bool:
        """Keep `weights` if their version is newer than the stored one; whether they were."""
        with self._transaction() as db:
            return bool(
                db.execute(
                    "INSERT INTO learned_weights (id, version, body) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
                    "body = excluded.body WHERE excluded.version > learned_weights.version",
                    (weights.version, weights.to_json()),
                ).rowcount
            )

    def close(self) -> None:
        """Close every connection the store opened; using it afterwards raises RuntimeError."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()

    def _bucket(self, at: float) -> int:
        """The start, in ms, of the stored count's bucket that holds time `at`."""
        return int(at * 1000) // self._bucket_ms * self._bucket_ms

    @contextlib.contextmanager
    def _healing(self, db: sqlite3.Connection) -> Iterator[None]:
        """Drop this thread's connection when it failed in a way the next one may not.

        A connection opened while the file could not be written stays read-only for good, one
        that met an I/O error may keep meeting it, and one that waited out the busy timeout
        may hold a stale view: each is closed, and the next use opens a fresh one, so the
        store recovers by itself once the file is writable (or the lock free) again.
        """
        try:
            yield
        except sqlite3.Error as exc:
            if _heals_by_reopening(exc):
                self._drop(db)
            raise

    def _drop(self, db: sqlite3.Connection) -> None:
        with self._lock:
            if db in self._connections:
                self._connections.remove(db)
        if getattr(self._local, "db", None) is db:
            self._local.db = None
        with contextlib.suppress(sqlite3.Error):
            db.close()

    @contextlib.contextmanager
    def _transaction(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction on this thread's connection: committed, or rolled back."""
        db = self._connection() if db is None else db
        with _translated(), self._healing(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema made) on its first use."""
        if self._closed:
            raise RuntimeError("the feedback store is closed")
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        if sqlite3.sqlite_version_info < _SQLITE_NEEDED:
            raise FeedbackStoreError(
                "feedback store (SQLite): it needs SQLite "
                f"{'.'.join(map(str, _SQLITE_NEEDED))} or newer, and this Python's is "
                f"{sqlite3.sqlite_version}"
            )
        with _translated():
            # Autocommit (isolation_level None): every transaction is begun by hand, so the
            # write lock is taken when BEGIN IMMEDIATE says, not at the driver's first write.
            db = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL loses no committed data on a process crash, only on power loss.
            db.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            if self._closed:
                db.close()
                raise RuntimeError("the feedback store is closed")
            self._connections.append(db)
            self._local.db = db
            if not self._schema_ready:
                with self._transaction(db) as schema:
                    _make_schema(schema, self._bucket_ms)
                self._schema_ready = True
        return db


class _Live:
    """A live impression that a batch's events name: read once, written back once if clicked."""

    __slots__ = ("changed", "positives", "shown", "team_clicks")

    def __init__(self, request_id: str, body: str, team_clicks: str | None, positives: int):
        try:
            self.shown = ShownItems.from_json(body)
            self.team_clicks: dict[str, int] = (
                {} if team_clicks is None else pydantic_core.from_json(team_clicks)
            )
        except ValueError as exc:  # not what this gateway wrote: the store is not to be trusted
            raise _unreadable(request_id, exc) from exc
        self.positives = positives
        self.changed = False


def _unreadable(request_id: str, exc: ValueError) -> FeedbackStoreError:
    return FeedbackStoreError(
        f"feedback store (SQLite): impression {request_id!r} is unreadable: {exc}"
    )


def _json(value: object) -> str:
    return pydantic_core.to_json(value).decode()


def _write(db: sqlite3.Connection, statement: str, rows: Sequence[tuple[object, ...]]) -> int:
    """Run a statement on `rows` (`_rows`); how many rows it changed. Nothing for no rows."""
    if not rows:
        return 0
    return db.execute(statement, (_json(rows),)).rowcount


def _read_live(db: sqlite3.Connection, request_ids: set[str], cutoff: float) -> dict[str, _Live]:
    """The live impressions among `request_ids`."""
    (found,) = db.execute(_LIVE, (cutoff, _json(list(request_ids)))).fetchone()
    return {
        request_id: _Live(request_id, body, team_clicks, positives)
        for request_id, body, team_clicks, positives in pydantic_core.from_json(found)
    }


def _read_seen(db: sqlite3.Connection, request_ids: set[str]) -> set[tuple[str, str]]:
    """The event ids already accepted for `request_ids`, as (request id, event id)."""
    (found,) = db.execute(_SEEN, (_json(list(request_ids)),)).fetchone()
    return {(request_id, event_id) for request_id, event_id in pydantic_core.from_json(found)}


def _judge(
    event: FeedbackEvent,
    live: dict[str, _Live],
    seen: set[tuple[str, str]],
    new_seen: list[tuple[str, str]],
    added: _Added,
) -> EventResult:
    """One event of a batch, judged against what the batch read and what it changed so far."""
    impression = live.get(event.request_id)
    if impression is None:
        return EventResult.UNKNOWN_REQUEST
    try:
        shown = impression.shown
        item = shown.item(event.item_id)
        teams = shown.teams() if item is not None and item.team is not None else ()
    except ValueError as exc:
        raise _unreadable(event.request_id, exc) from exc
    if item is None:
        return EventResult.ITEM_NOT_SHOWN
    if event.event_id is not None:
        key = (event.request_id, event.event_id)
        if key in seen:
            return EventResult.DUPLICATE
        seen.add(key)
        new_seen.append(key)
    counters = added.counters
    counters[("event", event.event, "count")] += 1
    if event.event not in POSITIVE_EVENTS:
        return EventResult.ACCEPTED
    for name, share in credit_for(item).items():
        counters[("recommender", name, "clicks")] += 1
        counters[("recommender", name, "credit")] += share
    team_clicks = impression.team_clicks
    if item.team is not None:
        before = {team: team_clicks.get(team, 0) for team in teams}
        after = {**before, item.team: before[item.team] + 1}
        for pair, change in pairwise_delta(before, after).items():
            added.pairs[pair] = _plus(added.pairs.get(pair), change)
        team_clicks[item.team] = after[item.team]
    if shown.arm is not None:
        if impression.positives == 0:
            counters[("arm", shown.arm, "clicked_impressions")] += 1
        counters[("arm", shown.arm, "clicks")] += 1
    impression.positives += 1
    impression.changed = True
    return EventResult.ACCEPTED


def _make_schema(db: sqlite3.Connection, bucket_ms: int) -> None:
    """The tables, made or brought to `_SCHEMA_VERSION`, in the caller's write transaction."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version == 1:
        for statement in _BEFORE_SCHEMA_FROM_1:
            db.execute(statement)
    for statement in _SCHEMA:
        db.execute(statement)
    if version == 1:
        for statement in _AFTER_SCHEMA_FROM_1:
            db.execute(statement)
    if version in (1, 2):
        db.execute(_COUNT_STORED, (bucket_ms, bucket_ms))
    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
