"""Feedback in a worker: experiment arms, impressions written off the loop, events, learning.

One `FeedbackService` per worker process, made after gunicorn forks
(`gateway.runtime.worker_runtime`), with the store the settings name (`gateway.feedback.store`). On
the request path it does two
cheap things on the event loop, and never any I/O there:

- `assign`: the user's pseudonym (`hash_user`), and the experiment arm that decides how the
  answer is fused (a request that names its `fusion` is outside the experiment, arm null);
- `record`: what the answer showed, in its stored form (`EncodedImpression`: one encoder
  call while the answer's items are still in the CPU's caches), appended to a bounded list.
  When `queue_limit` are waiting, the impression is dropped and counted: never unbounded
  memory, never a wait.

Its writer thread saves the waiting impressions in one batch every `flush_interval_ms`, deletes
expired ones now and then, and every `learner.interval_s` runs the learner (stats, update,
save, publish the weights that `weights: learned` arms fuse with). Events from `POST
/feedback` are judged by its event thread (`judge`, awaited on the loop: the events of
concurrent requests judged together, one store transaction per group, `gateway.feedback.judge`);
`report` (`GET /experiments`) blocks on the store: the web layer runs it with
`asyncio.to_thread`.

An event can come before the impression it names is written: within this worker the waiting
impressions are written first; one written by another worker or instance may take a flush
interval, so an event found unknown is judged once more after two flush intervals before it
is called unknown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config.feedback import ArmSettings, FeedbackSettings
from gateway.core.fusion import FusedRanking, FusionChoice
from gateway.feedback.attribution import preference, wilson_interval
from gateway.feedback.impressions import (
    EncodedImpression,
    EventKind,
    FeedbackEvent,
    assign_arm,
    hash_user,
)
from gateway.feedback.judge import EventJudge
from gateway.feedback.learner import WeightLearner
from gateway.feedback.records import (
    EventResult,
    FeedbackStats,
    FeedbackStoreError,
    LearnedWeights,
)
from gateway.feedback.store import FeedbackStore, open_store
from gateway.observability import metrics

__all__ = ["EVENT_KINDS", "Assignment", "FeedbackService"]

log = logging.getLogger("gateway")

EVENT_KINDS: tuple[EventKind, ...] = ("click", "purchase", "dismiss")
# Expired impressions are deleted at most this often (the stores already treat them as gone).
_EXPIRE_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Assignment:
    """How one request is fused: its user's pseudonym, its arm, the fusion and the weights.

    `fusion` None: the settings' default; `weights` None: the recommenders' configured ones.
    """

    user_hash: str | None
    arm: str | None
    fusion: FusionChoice | None
    weights: Mapping[str, float] | None


class FeedbackService:
    """A worker's feedback: assignment, the impression writer, events, the learner.

    `weights`: every recommender's configured weight (`Settings.fusion_weights`). Off (no
    store in `settings`), `assign` passes the request's fusion through and `record` does
    nothing. `clock` (unix seconds) stamps impressions; `async_sleep` waits before an unknown
    event is judged again (tests pass fakes).
    """

    def __init__(
        self,
        settings: FeedbackSettings,
        weights: Mapping[str, float],
        record_metrics: bool = True,
        clock: Callable[[], float] = time.time,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.configured = dict(weights)
        self._metrics = record_metrics
        self._clock = clock
        self._async_sleep = async_sleep
        self._flush_s = settings.flush_interval_ms / 1000
        # /experiments' last snapshot and when it was read (`monotonic`); one reader at a time.
        self._monotonic = monotonic
        self._report_refresh_s = settings.report_refresh_ms / 1000
        self._snapshot: tuple[float, dict[str, Any]] | None = None
        self._snapshot_lock = threading.Lock()
        self._arms: dict[str, ArmSettings] = {a.name: a for a in settings.experiments.arms}
        # The arms' shares now: an exploring arm's falls as the learner's evidence narrows
        # (`_explore`); one list swapped whole, read on the loop.
        self._shares = [(arm.name, arm.share) for arm in settings.experiments.arms]
        salt = settings.salt.get_secret_value() if settings.salt is not None else ""
        self._salt = salt.encode()
        learnt = {name: w for name, w in self.configured.items() if w > 0}
        rule = settings.learner
        # The prior: where learning starts, the configured weights unless `start_weights`
        # say otherwise (a recommender configured at 0, a shadow, stays out of learning).
        start = {name: (rule.start_weights or {}).get(name, w) for name, w in learnt.items()}
        self.learner = WeightLearner(
            list(learnt),
            start,
            min_evidence=rule.min_evidence,
            floor=rule.floor,
            max_weight=rule.max_weight,
            beta=rule.beta,
            prior=rule.prior,
            start_strength=rule.start_strength,
            frozen=rule.frozen,
            clock=clock,
            # A prior is given by start_weights, or by configured weights that differ: equal
            # ones say nothing of which recommender is better.
            informed=rule.start_weights is not None or len(set(learnt.values())) > 1,
            leader_first=rule.cold_start == "leader",
        )
        # Until the first round of the learner reads the counters: what the start alone knows.
        self._explore(self.learner.uncertainty(FeedbackStats()))
        self._store: FeedbackStore | None = None
        if settings.store is not None:
            self._store = open_store(
                settings.store, settings.retention_s, clock, settings.store_timeout_ms / 1000
            )
        self._lock = threading.Lock()
        self._pending: list[EncodedImpression] = []
        self._dropped = 0
        # Held while waiting impressions are taken and written, so that an event judged after
        # it finds every impression recorded before it.
        self._flushing = threading.Lock()
        self._learned: LearnedWeights | None = None
        self._in_use: Mapping[str, float] = self.learner.before_evidence(FeedbackStats())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Its thread starts with the first event: a worker nobody clicks through has none.
        self.events = EventJudge(
            self._judge_together, settings.event_queue_limit, group_limit=settings.max_events
        )

    @property
    def enabled(self) -> bool:
        """Whether feedback is on: a store is configured."""
        return self._store is not None

    @property
    def learned(self) -> LearnedWeights | None:
        """The learnt weights this worker last published; None before the first."""
        return self._learned

    def weights_in_use(self) -> Mapping[str, float]:
        """The weights `learned` arms fuse with: learnt when learning, else configured.

        Made when the weights are published, not per request; not to be changed.
        """
        return self._in_use

    # --- On the loop ----------------------------------------------------------------------

    def assign(self, user_id: str | None, fusion: FusionChoice | None) -> Assignment:
        """The user's pseudonym and arm, and how to fuse: cheap, no I/O (on the loop)."""
        if self._store is None:
            return Assignment(None, None, fusion, None)
        user_hash = hash_user(user_id, self._salt) if user_id is not None else None
        if fusion is not None or user_hash is None or not self._shares:
            return Assignment(user_hash, None, fusion, None)
        arm = self._arms[assign_arm(user_hash, self._shares)]
        weights = self.weights_in_use() if arm.weights == "learned" else arm.weights
        return Assignment(user_hash, arm.name, arm.fusion, weights)

    def record(self, request_id: str, assignment: Assignment, fused: FusedRanking) -> None:
        """Keep what the answer showed for the writer; dropped and counted when it is full.

        An answer with no fused items (fusion `none`, or empty lists) shows nothing to
        click, and is not recorded.
        """
        if self._store is None or not fused.items:
            return
        if len(self._pending) >= self.settings.queue_limit:
            with self._lock:
                self._dropped += 1
            return
        # Encoded here, not in the writer thread: the items were just made and are still in
        # the CPU's caches, where the writer, waking every flush interval, finds them cold.
        shown = EncodedImpression.of_answer(
            request_id,
            self._clock(),
            assignment.arm,
            fused.items,
            fused.teams or (None,) * len(fused.items),
        )
        with self._lock:
            if len(self._pending) < self.settings.queue_limit:
                self._pending.append(shown)
                return
            self._dropped += 1

    # --- Lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (in the worker, after the fork); idempotent."""
        if self._store is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gateway-feedback", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is waiting, stop the writer and close the store (blocks)."""
        if self._store is None:
            return
        self.events.close(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        else:
            self._last_flush()
        self._store.close()

    # --- Off the loop ---------------------------------------------------------------------

    async def judge(self, events: Sequence[FeedbackEvent]) -> list[EventResult]:
        """Judge and count `events` in the store, in order: with other requests' events, by
        the event thread (the loop never blocks).

        `FeedbackStoreError` when the store failed, `FeedbackStoreBusy` when too many events
        wait already (`feedback.event_queue_limit`).
        """
        self._require_store()
        results = await self.events.judge(events, self.settings.answer_within_ms / 1000)
        unknown = _unknown(results)
        if unknown:
            await self._async_sleep(2 * self._flush_s)
            again = [events[i] for i in unknown]
            _merge(
                results,
                unknown,
                await self.events.judge(again, self.settings.answer_within_ms / 1000),
            )
        self._observe(events, results)
        return results

    def flush(self) -> None:
        """Write the waiting impressions now (blocks); the writer does it every interval."""
        self._flush()

    def learn(self) -> LearnedWeights:
        """One round of the learner: stats, update, save (newest version wins), publish, and
        the exploring arms' shares from what the evidence still leaves open."""
        store = self._require_store()
        stats = store.stats()
        self._explore(self.learner.uncertainty(stats))
        current = store.load_weights()
        updated = self.learner.update(stats, current)
        if updated is not current:
            if store.save_weights(updated):
                if self._metrics:
                    metrics.observe_learner_update()
            else:
                # Another worker or instance saved this version first: theirs is the one.
                updated = store.load_weights() or updated
        self._publish(updated)
        return updated

    def report(self) -> dict[str, Any]:
        """The body of `GET /experiments`: counters, credit, pairwise preferences, arms.

        From a snapshot of the store's counters at most `feedback.report_refresh_ms` old: a
        flood of GETs reads the store once per interval per worker, whatever their number, and
        a GET writes nothing (the impressions this worker holds are written by its writer,
        every `flush_interval_ms`), so the report reads while writes fail.
        """
        with self._snapshot_lock:
            snapshot = self._snapshot
            if snapshot is not None and self._monotonic() - snapshot[0] < self._report_refresh_s:
                return snapshot[1]
            read_at = self._monotonic()
            body = self._fresh_report()
            self._snapshot = (read_at, body)
            return body

    def _fresh_report(self) -> dict[str, Any]:
        stats = self._require_store().stats()
        in_use = self.weights_in_use()
        names = list(self.configured) + sorted(set(stats.recommenders) - set(self.configured))
        recommenders = {}
        for name in names:
            counts = stats.recommenders.get(name)
            recommenders[name] = {
                "impressions": counts.impressions if counts else 0,
                "clicks": counts.clicks if counts else 0,
                "credit": round(stats.credit_share(name), 6),
                "weight": in_use.get(name, self.configured.get(name)),
            }
        pairwise = []
        for (a, b), pair in sorted(stats.pairwise.items()):
            share = preference(pair.wins, pair.losses, pair.ties)
            pairwise.append(
                {
                    "a": a,
                    "b": b,
                    "wins": pair.wins,
                    "losses": pair.losses,
                    "ties": pair.ties,
                    "preference": round(share.share, 6),
                    "low": round(share.low, 6),
                    "high": round(share.high, 6),
                }
            )
        arms = {}
        shares = self.shares()
        for name in list(self._arms) + sorted(set(stats.arms) - set(self._arms)):
            arm_counts = stats.arms.get(name)
            shown = arm_counts.impressions if arm_counts else 0
            clicked = min(arm_counts.clicked_impressions, shown) if arm_counts else 0
            arm = self._arms.get(name)
            arms[name] = {
                "fusion": arm.fusion if arm else None,
                "explore": arm.explore if arm else False,
                "share_now": round(shares.get(name, 0.0), 6),
                "clicks": arm_counts.clicks if arm_counts else 0,
                **_click_rate(clicked, shown),
            }
        learned = self._learned
        return {
            "recommenders": recommenders,
            "pairwise": pairwise,
            "arms": arms,
            "served": _click_rate(
                sum(row["clicked_impressions"] for row in arms.values()),
                sum(row["impressions"] for row in arms.values()),
            ),
            "exploration": {
                "share_now": round(
                    sum(shares.get(n, 0.0) for n, arm in self._arms.items() if arm.explore), 6
                ),
                "uncertainty": round(self.learner.uncertainty(stats), 6),
            },
            "weights": {
                "in_use": dict(in_use),
                "learning": self.settings.learner.enabled,
                "frozen": self.settings.learner.frozen,
                "evidence": self.learner.evidence(stats),
                "version": learned.version if learned else 0,
                "updated_at": learned.updated_at if learned else None,
                "initial": dict(self.learner.initial),
                "prior": self._prior_report(stats),
            },
            "events": {kind: stats.events.get(kind, 0) for kind in EVENT_KINDS},
            "impressions_stored": stats.impressions_stored,
        }

    def _prior_report(self, stats: FeedbackStats) -> dict[str, object]:
        """Where learning starts, what it is worth now, and the evidence against it if any."""
        agree, disagree = self.learner.agreement(stats)
        return {
            "from": self._prior_from(),
            "strength": self.learner.strength(stats),
            "agreement": {"agree": agree, "disagree": disagree},
            "contradicted": self.learner.contradicted(stats),
        }

    def _prior_from(self) -> str:
        """Where learning starts: `start_weights`, the configured weights when they differ,
        or `none` (equal ones; `cold_start` says what is served until `min_evidence`)."""
        if self.settings.learner.start_weights is not None:
            return "start_weights"
        return "recommenders" if self.learner.informed else "none"

    def _judge_together(self, events: Sequence[FeedbackEvent]) -> list[EventResult]:
        """One store call for `events`, after this worker's waiting impressions are written."""
        store = self._require_store()
        self._flush()
        return store.record(events)

    def _observe(self, events: Sequence[FeedbackEvent], results: Sequence[EventResult]) -> None:
        if self._metrics:
            judged = zip(events, results, strict=True)
            metrics.observe_feedback([(event.event, result.value) for event, result in judged])

    # --- The writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        learner = self.settings.learner
        now = time.monotonic()
        next_expire = now + min(_EXPIRE_EVERY_S, self.settings.retention_s)
        next_learn = now
        while not self._stop.wait(self._flush_s):
            self._guarded("writing impressions", "save", self._flush)
            now = time.monotonic()
            if now >= next_expire:
                next_expire = now + min(_EXPIRE_EVERY_S, self.settings.retention_s)
                self._guarded("expiring impressions", "expire", self._store_expire)
            if learner.enabled and now >= next_learn:
                next_learn = now + learner.interval_s
                self._guarded("learning weights", "learn", self.learn)
        self._last_flush()

    def _last_flush(self) -> None:
        """Write what is held before the worker stops: tried again while the store fails, for
        `stop_within_ms`; what could not be written is said (a log line) and counted."""
        give_up = time.monotonic() + self.settings.stop_within_ms / 1000
        while True:
            try:
                self._flush()
                return
            except FeedbackStoreError as exc:
                failure: Exception = exc
            except Exception as exc:  # the gateway's own bug: still say what is lost
                log.exception("feedback: writing the last impressions failed")
                failure = exc
            if self._metrics:
                metrics.observe_feedback_store_error("save")
            left = give_up - time.monotonic()
            if left <= 0 or not isinstance(failure, FeedbackStoreError):
                break
            time.sleep(min(_STOP_RETRY_S, left))
        with self._lock:
            lost = len(self._pending) + self._dropped
            self._pending, self._dropped = [], 0
        if not lost:
            return
        log.error(
            "feedback: %d impressions could not be written before the worker stopped "
            "(the store kept failing for %.1f s: %s); they are dropped, and clicks on them "
            "will be answered 404",
            lost,
            self.settings.stop_within_ms / 1000,
            failure,
        )
        if self._metrics:
            metrics.observe_impressions(dropped=lost)
            metrics.flush()

    def _guarded(self, doing: str, operation: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:
            if isinstance(exc, FeedbackStoreError):
                log.warning("feedback: %s failed: %s", doing, exc)
            else:
                log.exception("feedback: %s failed", doing)
            if self._metrics:
                metrics.observe_feedback_store_error(operation)

    def _store_expire(self) -> None:
        self._require_store().expire()

    def _flush(self) -> None:
        store = self._require_store()
        with self._flushing:
            with self._lock:
                waiting, self._pending = self._pending, []
                dropped, self._dropped = self._dropped, 0
            if self._metrics and dropped:
                metrics.observe_impressions(dropped=dropped)
            if not waiting:
                return
            try:
                store.save_impressions(waiting)
            except FeedbackStoreError:
                self._requeue(waiting)
                if self._metrics:
                    metrics.observe_impressions_waiting(len(self._pending))
                raise
            if self._metrics:
                metrics.observe_impressions(recorded=len(waiting))
                metrics.observe_impressions_waiting(len(self._pending))

    def _requeue(self, waiting: list[EncodedImpression]) -> None:
        """Put a batch the store refused back in front, within the limit (the oldest go)."""
        with self._lock:
            merged = waiting + self._pending
            excess = max(0, len(merged) - self.settings.queue_limit)
            self._pending = merged[excess:]
            self._dropped += excess

    def _explore(self, uncertainty: float) -> None:
        """Each exploring arm's share: `share` times (uncertainty / 0.5)², never below
        `min_share`.

        Squared: exploration falls as the variance of what is learnt does, about as
        1/evidence, the schedule of decaying ε-greedy (ε_t ∝ 1/t: Auer, Cesa-Bianchi &
        Fischer, "Finite-time analysis of the multiarmed bandit problem", 2002), where the
        half-width alone (1/sqrt) would keep exploring four times as long for each halving.
        """
        scale = min(1.0, uncertainty / 0.5) ** 2
        self._shares = [
            (arm.name, max(arm.min_share, arm.share * scale) if arm.explore else arm.share)
            for arm in self.settings.experiments.arms
        ]

    def shares(self) -> dict[str, float]:
        """The arms' shares now, normalised to sum to 1."""
        total = sum(share for _name, share in self._shares)
        return {name: share / total if total else 0.0 for name, share in self._shares}

    def _publish(self, learned: LearnedWeights) -> None:
        changed = self._learned is None or dict(self._learned.weights) != dict(learned.weights)
        self._learned = learned
        if self.settings.learner.enabled:
            # One reference swapped: a request on the loop reads the old or the new, whole.
            self._in_use = {**self.learner.initial, **learned.weights}
        if changed and self._metrics:
            metrics.observe_learned_weights(learned.weights)

    def _require_store(self) -> FeedbackStore:
        if self._store is None:
            raise RuntimeError("feedback is off: no store is configured")
        return self._store


def _click_rate(clicked: int, shown: int) -> dict[str, Any]:
    """Impressions, those clicked, the CTR and its 95% Wilson interval, as /experiments has them."""
    low, high = wilson_interval(clicked, shown)
    return {
        "impressions": shown,
        "clicked_impressions": clicked,
        "ctr": round(clicked / shown, 6) if shown else 0.0,
        "low": round(low, 6),
        "high": round(high, 6),
    }


# How often a stopping worker tries the store again for its last impressions.
_STOP_RETRY_S = 0.2


def _unknown(results: Sequence[EventResult]) -> list[int]:
    """Where the events whose request was not found are."""
    return [i for i, result in enumerate(results) if result is EventResult.UNKNOWN_REQUEST]


def _merge(results: list[EventResult], at: list[int], again: Sequence[EventResult]) -> None:
    """Put the second judgement of the events at `at` in their places."""
    for i, result in zip(at, again, strict=True):
        results[i] = result
