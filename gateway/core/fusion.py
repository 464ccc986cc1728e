"""Fusion: the recommenders' lists merged into one ranking, each item saying where it came from.

Strategies share one interface (`Fusion.fuse`) and are chosen by name from `FUSIONS`:

- ``concat``: each list in config order, duplicates removed, first occurrence kept;
- ``rrf``: reciprocal rank fusion, score(d) = Σ_r w_r / (k + rank_r(d)), ranks from 1
  (Cormack, Clarke & Buettcher, SIGIR 2009);
- ``weighted``: scores min-max normalised per list, times the list's weight, summed (CombSUM);
- ``combmnz``: CombSUM times the number of lists that contain the item;
- ``interleave``: team-draft interleaving (Radlinski, Kurup & Joachims, CIKM 2008), the
  teams' picking order drawn per round from a generator seeded by the request id.

Items are matched by the `id` of each recommender's `items`. Ties are broken by the best rank
the item reached in any list, then by id: never by the order in which answers arrived.

`Fuser`, built once from the settings (weights, default fusion, k), fuses one request's
outcomes: shadow-mode recommenders (weight 0) left out, coverage computed, the chosen strategy
applied, and the items written as the response sends them (`gateway.contract.schemas.FusedItem`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, TypeGuard

from gateway.core.outcome import Outcome

__all__ = [
    "FUSIONS",
    "FusedRanking",
    "Fuser",
    "Fusion",
    "FusionChoice",
    "FusionName",
    "Provenance",
    "Ranked",
    "Scored",
    "coverage",
    "make_fusion",
    "ranked_from",
]


# The names in requests, config and the OpenAPI enum; `FUSIONS` must have exactly these.
FusionName = Literal["concat", "rrf", "weighted", "combmnz", "interleave"]
# What a request or the config may choose: a fusion, or "none" (no fused ranking at all).
FusionChoice = FusionName | Literal["none"]


@dataclass(frozen=True, slots=True)
class Ranked:
    """One recommender's answer as a ranked list of `(id, score)`; score None when absent."""

    name: str
    weight: float
    items: tuple[tuple[str, float | None], ...]


class Provenance(NamedTuple):
    """Where a fused item was: which recommender, at which rank (from 1), with which score.

    Sent as `gateway.contract.schemas.FusedSource`. A named tuple: a fused ranking makes one per
    item and list, and a tuple is made at half the cost of a frozen dataclass.
    """

    name: str
    rank: int
    score: float | None


@dataclass(slots=True)
class Scored:
    """One item of the fused ranking, with its fused score and its provenance.

    Sent as `gateway.contract.schemas.FusedItem` (`Fuser.fuse` writes it so). `team`: under
    team-draft interleaving, the list whose turn placed the item (what a click on it credits); never
    sent.
    """

    id: str
    score: float
    sources: list[Provenance] = field(default_factory=list)
    team: str | None = None


def ranked_from(name: str, weight: float, prediction: Any) -> Ranked:
    """A recommender's `{"items": [{"id", "score"}, ...]}` as a `Ranked`; odd entries skipped."""
    items = prediction.get("items") if isinstance(prediction, dict) else None
    if not isinstance(items, list):
        return Ranked(name, weight, ())
    seen: set[str] = set()
    ranked = []
    # Runs for every item of every answer: exact type tests (`type(x) is str`) are the fast
    # path, and the slower checks only decide the odd cases.
    for entry in items:
        if type(entry) is not dict:
            continue
        item_id = entry.get("id")
        if type(item_id) is not str:
            if not isinstance(item_id, str | int):
                continue
            item_id = str(item_id)
        if item_id in seen:  # a repeat within one list keeps its first, better rank
            continue
        seen.add(item_id)
        score = entry.get("score")
        if type(score) is not float:
            score = float(score) if _is_number(score) else None
        ranked.append((item_id, score))
    return Ranked(name, weight, tuple(ranked))


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


def coverage(answered: Sequence[_Named], weights: Mapping[str, float]) -> float:
    """The summed weight of the recommenders that answered, over the total weight."""
    total = sum(weights.values())
    return round(sum(weights[a.name] for a in answered) / total, 4) if total else 0.0


def _provenance(lists: Sequence[Ranked]) -> dict[str, list[Provenance]]:
    found: dict[str, list[Provenance]] = {}
    for ranked in lists:
        for rank, (item_id, score) in enumerate(ranked.items, start=1):
            found.setdefault(item_id, []).append(Provenance(ranked.name, rank, score))
    return found


def _best_ranks(lists: Sequence[Ranked]) -> dict[str, int]:
    """The best rank each item reached in any list."""
    best: dict[str, int] = {}
    for ranked in lists:
        for rank, (item_id, _) in enumerate(ranked.items, start=1):
            if rank < best.get(item_id, rank + 1):
                best[item_id] = rank
    return best


def _top(
    scores: Mapping[str, float],
    lists: Sequence[Ranked],
    size: int,
    best_rank: Mapping[str, int] | None = None,
) -> list[Scored]:
    """The `size` best by score; ties by best rank anywhere, then id."""
    if best_rank is None:
        best_rank = _best_ranks(lists)
    # Sorted whole: for the few dozen items of a request, C's sort is quicker than a heap
    # kept in Python (heapq.nsmallest), and the order is the same.
    keyed = sorted([(-s, best_rank[i], i) for i, s in scores.items()])
    order = keyed[:size] if len(keyed) > size else keyed
    chosen = {item_id for _, _, item_id in order}
    # Provenance for the chosen items only, in list order as `_provenance` gives it.
    where: dict[str, list[Provenance]] = {item_id: [] for item_id in chosen}
    for ranked in lists:
        for rank, (item_id, score) in enumerate(ranked.items, start=1):
            if item_id in chosen:
                where[item_id].append(Provenance(ranked.name, rank, score))
    return [Scored(i, round(-negative, 6), where[i]) for negative, _, i in order]


class Fusion(Protocol):
    """Merges ranked lists into one."""

    name: ClassVar[str]

    def fuse(self, lists: Sequence[Ranked], size: int, seed: str) -> list[Scored]:
        """The top `size` items of the fused ranking (`seed` for strategies that draw)."""
        ...


class Concat:
    """Each list in turn, duplicates removed, first occurrence kept."""

    name: ClassVar[str] = "concat"

    def fuse(self, lists: Sequence[Ranked], size: int, seed: str) -> list[Scored]:
        """Lists in config order; an item's score is its score where it first appears."""
        where = _provenance(lists)
        fused: list[Scored] = []
        for ranked in lists:
            for item_id, score in ranked.items:
                if len(fused) == size:
                    return fused
                if item_id not in {f.id for f in fused}:
                    fused.append(Scored(item_id, score or 0.0, where[item_id]))
        return fused


class ReciprocalRank:
    """Reciprocal rank fusion: Σ w / (k + rank)."""

    name: ClassVar[str] = "rrf"

    def __init__(self, k: int = 60):
        self.k = k

    def fuse(self, lists: Sequence[Ranked], size: int, seed: str) -> list[Scored]:
        """Sum each list's weighted reciprocal rank."""
        scores: dict[str, float] = {}
        best: dict[str, int] = {}  # for the ties, gathered on the same pass
        k = self.k
        for ranked in lists:
            weight = ranked.weight
            for rank, (item_id, _) in enumerate(ranked.items, start=1):
                known = scores.get(item_id)
                if known is None:
                    scores[item_id] = weight / (k + rank)
                    best[item_id] = rank
                else:
                    scores[item_id] = known + weight / (k + rank)
                    if rank < best[item_id]:
                        best[item_id] = rank
        return _top(scores, lists, size, best)


def _normalised(ranked: Ranked) -> dict[str, float]:
    """Min-max normalised scores; a list without scores is scored by rank instead."""
    raw = {
        item_id: score if score is not None else -float(rank)
        for rank, (item_id, score) in enumerate(ranked.items, start=1)
    }
    if not raw:
        return {}
    low, high = min(raw.values()), max(raw.values())
    if high == low:
        return dict.fromkeys(raw, 1.0)
    return {item_id: (value - low) / (high - low) for item_id, value in raw.items()}


class CombSum:
    """CombSUM: normalised scores times weights, summed."""

    name: ClassVar[str] = "weighted"

    def _sums(self, lists: Sequence[Ranked]) -> tuple[dict[str, float], dict[str, int]]:
        sums: dict[str, float] = {}
        hits: dict[str, int] = {}
        for ranked in lists:
            for item_id, value in _normalised(ranked).items():
                sums[item_id] = sums.get(item_id, 0.0) + ranked.weight * value
                hits[item_id] = hits.get(item_id, 0) + 1
        return sums, hits

    def fuse(self, lists: Sequence[Ranked], size: int, seed: str) -> list[Scored]:
        """Sum each list's weighted, normalised score."""
        return _top(self._sums(lists)[0], lists, size)


class CombMnz(CombSum):
    """CombMNZ: CombSUM times the number of lists containing the item."""

    name: ClassVar[str] = "combmnz"

    def fuse(self, lists: Sequence[Ranked], size: int, seed: str) -> list[Scored]:
        """CombSUM, rewarding agreement."""
        sums, hits = self._sums(lists)
        return _top({i: sums[i] * hits[i] for i in sums}, lists, size)


class TeamDraft:
    """Team-draft interleaving: each round, the teams (lists) pick in a random order."""

    name: ClassVar[str] = "interleave"

    def fuse(self, lists: Sequence[Ranked], size: int, seed: str) -> list[Scored]:
        """Round by round, each list adds its best item not yet picked; score 1 / position."""
        where = _provenance(lists)
        rng = random.Random(hashlib.blake2b(seed.encode(), digest_size=8).digest())
        queues = [list(ranked.items) for ranked in lists]
        picked: list[tuple[str, str]] = []  # (item, the team that picked it)
        taken: set[str] = set()
        while len(picked) < size and any(queues):
            order = list(range(len(queues)))
            rng.shuffle(order)
            for team in order:
                queue = queues[team]
                while queue and queue[0][0] in taken:
                    queue.pop(0)
                if queue and len(picked) < size:
                    item_id = queue.pop(0)[0]
                    picked.append((item_id, lists[team].name))
                    taken.add(item_id)
        return [
            Scored(item_id, round(1 / position, 6), where[item_id], team=name)
            for position, (item_id, name) in enumerate(picked, start=1)
        ]


FUSIONS: dict[str, type[Fusion]] = {
    strategy.name: strategy for strategy in (Concat, ReciprocalRank, CombSum, CombMnz, TeamDraft)
}


def make_fusion(name: str, rrf_k: int = 60) -> Fusion:
    """The strategy called `name` (`KeyError` for an unknown one)."""
    if name == ReciprocalRank.name:
        return ReciprocalRank(rrf_k)
    return FUSIONS[name]()


@dataclass(frozen=True, slots=True)
class FusedRanking:
    """One request's fusion: the strategy used, its items as sent, and the coverage.

    `teams`: for each item, the team that placed it (`Scored.team`), kept for the impression
    (`gateway.feedback.service`) and never sent.
    """

    fusion: FusionChoice
    items: list[dict[str, Any]]
    coverage: float
    teams: tuple[str | None, ...] = ()


class Fuser:
    """Fuses one request's outcomes as the settings say: weights, default fusion, rrf's k."""

    def __init__(self, weights: Mapping[str, float], default: FusionChoice, rrf_k: int = 60):
        self.weights = dict(weights)
        self.default: FusionChoice = default
        # Fixed by the settings: made once, not per request.
        self.fusions = {name: make_fusion(name, rrf_k) for name in FUSIONS}

    def fuse(
        self,
        outcomes: Sequence[Outcome],
        fusion: FusionChoice | None,
        size: int,
        seed: str,
        weights: Mapping[str, float] | None = None,
    ) -> FusedRanking:
        """The top `size` items of `fusion` (default: the settings') over those that answered.

        `seed`: the request id, for the strategies that draw (`interleave`). `weights`: the
        lists' weights in fusion for the recommenders it names (an experiment arm's, or learnt
        ones), instead of the settings'. A weight of 0, configured or in `weights`, leaves the
        recommender out of the fusion; the coverage is the configured weights' share of the
        recommenders fused that answered.
        """
        configured = self.weights
        name = fusion or self.default
        chosen = configured if weights is None else {**configured, **weights}
        # A weight of 0 is shadow mode: the answer is returned in `result` but not fused.
        fused_here = {n: w for n, w in configured.items() if chosen[n] > 0}
        fusing = [o for o in outcomes if o.ok and chosen[o.name] > 0]
        covered = coverage(fusing, fused_here)
        if name == "none":
            return FusedRanking(name, [], covered)
        lists = [ranked_from(o.name, chosen[o.name], o.prediction) for o in fusing]
        fused = self.fusions[name].fuse(lists, size, seed)
        items = [
            {
                "id": item.id,
                "score": item.score,
                "sources": [
                    {"name": p.name, "rank": p.rank, "score": p.score}
                    if p.score is not None
                    else {"name": p.name, "rank": p.rank}
                    for p in item.sources
                ],
            }
            for item in fused
        ]
        return FusedRanking(name, items, covered, tuple(item.team for item in fused))
