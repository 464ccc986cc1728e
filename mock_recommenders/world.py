"""A seeded synthetic world for the mock recommenders to rank: items, users and held-out truth.

The world is a small generative model of a recommender system's data:

- a catalogue of items, each in one of a few genres, with a latent taste vector near its
  genre's centre, a long-tailed popularity, and a recent trend on top of it;
- users, one for any `user_id` (derived from a hash of it, so the same in every process),
  each liking one to three genres plus an idiosyncratic taste of their own;
- a user's true utility for an item: how well the item matches their taste, plus a pull
  towards what is popular right now;
- a user's interactions, sampled from their utility with noise (Plackett-Luce, by the Gumbel
  top-k trick). They are split at random into the *history*, which the recommenders know, and
  the *held-out* interactions, which they do not. The *truth* for a user is the held-out
  items, best first by true utility: what a quality benchmark scores rankings against.

Each mock recommender sees the world through its own imperfect lens (`KINDS`):

- ``psn``, personalised: a matrix-factorisation estimate of the user's taste and of the
  item vectors, both noisy; blind to popularity;
- ``sml``, item similarity: items whose content looks like what the user already has,
  from noisy content features; blind to popularity and to taste outside the history;
- ``asc``, co-occurrence: "people who had X also had Y", counted in the baskets (ten items
  each) of 1,500 other users; biased towards popular items, noisy on rare ones;
- ``trd``, trending: last period's popularity, measured with error, the same for everyone
  in a region (one of eight); blind to taste;
- any other name: a personalised recommender with more noise, seeded by its name (for
  benchmarks that fan out to many recommenders).

No recommender ever ranks an item in the user's history. Rankings are deterministic per
(world seed, recommender, user) and prefix-stable; a user's profile and each ranking are
cached, so serving stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "CATALOGUE_SIZE",
    "DEFAULT_SEED",
    "KINDS",
    "MAX_RESULTS",
    "User",
    "World",
    "default_world",
]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

DEFAULT_SEED = 2026
CATALOGUE_SIZE = 1000
# The longest list a mock serves (its `resultSize` limit); rankings are computed this deep once.
MAX_RESULTS = 100
KINDS = {
    "psn": "personalised (noisy matrix factorisation, blind to popularity)",
    "sml": "item similarity (noisy content features, against the user's history)",
    "asc": "co-occurrence (baskets of other users; popularity-biased)",
    "trd": "trending (last period's popularity, measured with error; not personal)",
}

_DIM = 16
_GENRES = 20
_HISTORY = 20
_HELD_OUT = 10
_BASKET = 10
_BACKGROUND_USERS = 1500
# Utility = taste match + _POPULARITY_PULL * current log-popularity; interactions are drawn
# from it with Gumbel noise at this temperature.
_POPULARITY_PULL = 0.5
_TEMPERATURE = 0.5
_REGIONS = 8
_CACHED_USERS = 16_384
_CACHED_RANKINGS = 65_536

_IDS = tuple(f"i{n}" for n in range(CATALOGUE_SIZE))


def _stable_seed(*parts: object) -> int:
    # blake2b, not hash(): Python salts hash() per process, and every process (gunicorn
    # workers, test runners, the quality harness) must derive the same users.
    key = "\x1f".join("<anonymous>" if p is None else str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(_stable_seed(*parts)))


def _gumbel_top(scores: Floats, count: int, rng: np.random.Generator) -> Ints:
    """`count` distinct indices drawn from softmax(scores) without replacement, in draw order."""
    keys = scores + rng.gumbel(size=scores.shape)
    top = np.argpartition(-keys, count)[:count]
    return top[np.argsort(-keys[top], kind="stable")]


@dataclass(frozen=True)
class User:
    """One user of the world."""

    user_id: str | None
    taste: Floats
    history: Ints
    truth: Ints
    """The held-out items, best first by true utility."""
    personal_noise: Floats
    """The error of `psn`'s estimate of this user's taste."""
    region: int
    """Where the user is: `trd` ranks by the trend in their region."""


class World:
    """The catalogue, the users and the recommenders' views of them, all from one seed."""

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        self.seed = seed
        rng = _rng("world", seed)
        self._centres = rng.normal(size=(_GENRES, _DIM))
        self.genre = rng.integers(_GENRES, size=CATALOGUE_SIZE)
        vectors = 0.8 * self._centres[self.genre] + 0.6 * rng.normal(size=(CATALOGUE_SIZE, _DIM))
        # Scaled so that a user's taste match has a standard deviation near 1.
        self.vectors = vectors / math.sqrt(_DIM)
        self.log_popularity = rng.normal(size=CATALOGUE_SIZE)
        self.trend = 0.5 * rng.normal(size=CATALOGUE_SIZE)
        self.pull = _POPULARITY_PULL * (self.log_popularity + self.trend)

        # psn: item vectors as a factorisation would learn them, with error.
        self._psn_vectors = self.vectors + 0.12 * rng.normal(size=self.vectors.shape)
        # sml: content features are a noisier view of the same latent space.
        content = self.vectors + 0.2 * rng.normal(size=self.vectors.shape)
        content /= np.linalg.norm(content, axis=1, keepdims=True)
        self._similarity = content @ content.T
        # trd: last period's popularity, measured with error.
        measured = self.log_popularity + 0.6 * self.trend + 0.3 * rng.normal(size=CATALOGUE_SIZE)
        # ...and per region (users belong to one), with the region's own slice of the trend.
        heat = measured + 0.15 * rng.normal(size=(_REGIONS, CATALOGUE_SIZE))
        self._trending = np.exp(heat - heat.max(axis=1, keepdims=True))
        # asc: the confidence of each rule "had X, so Y", counted in other users' baskets.
        self._confidence = self._baskets(rng)

    def _baskets(self, rng: np.random.Generator) -> Floats:
        tastes = np.stack([self._taste(rng) for _ in range(_BACKGROUND_USERS)])
        utility = (tastes @ self.vectors.T + self.pull) / _TEMPERATURE
        keys = utility + rng.gumbel(size=utility.shape)
        baskets = np.argpartition(-keys, _BASKET, axis=1)[:, :_BASKET]
        pairs = (baskets[:, :, None] * CATALOGUE_SIZE + baskets[:, None, :]).ravel()
        co_counts = np.bincount(pairs, minlength=CATALOGUE_SIZE**2).astype(np.float64)
        co_counts = co_counts.reshape(CATALOGUE_SIZE, CATALOGUE_SIZE)
        counts = co_counts.diagonal().copy()
        np.fill_diagonal(co_counts, 0.0)
        confidence: Floats = co_counts / np.maximum(counts, 1.0)[:, None]
        return confidence

    def _taste(self, rng: np.random.Generator) -> Floats:
        # Three draws of a liked genre: one, two or three genres, a repeat weighing more.
        liked = rng.integers(_GENRES, size=3)
        taste: Floats = self._centres[liked].mean(axis=0) + 0.5 * rng.normal(size=_DIM)
        return taste

    @functools.lru_cache(maxsize=_CACHED_USERS)  # noqa: B019 - one world per process
    def user(self, user_id: str | None) -> User:
        """The user behind `user_id` (anonymous is one more user)."""
        rng = _rng("user", self.seed, user_id)
        taste = self._taste(rng)
        utility = self.vectors @ taste + self.pull
        drawn = _gumbel_top(utility / _TEMPERATURE, _HISTORY + _HELD_OUT, rng)
        drawn = rng.permutation(drawn)
        history, held_out = drawn[:_HISTORY], drawn[_HISTORY:]
        truth = held_out[np.argsort(-utility[held_out], kind="stable")]
        return User(
            user_id=user_id,
            taste=taste,
            history=np.sort(history),
            truth=truth,
            personal_noise=0.5 * rng.normal(size=_DIM),
            region=int(rng.integers(_REGIONS)),
        )

    def scores(self, name: str, user: User) -> Floats:
        """Recommender `name`'s score for every item for `user`, each in [0, 1]."""
        if name == "psn":
            match = self._psn_vectors @ (user.taste + user.personal_noise)
            # Read as a click probability; the 0.5 keeps it from saturating near 1.
            return _sigmoid(0.5 * match)
        if name == "sml":
            similar: Floats = self._similarity[user.history].sum(axis=0)
            return (1.0 + similar / len(user.history)) / 2.0
        if name == "asc":
            confidence: Floats = self._confidence[user.history].sum(axis=0)
            return confidence / len(user.history)
        if name == "trd":
            trending: Floats = self._trending[user.region]
            return trending
        guess = user.taste + _rng("other", self.seed, name, user.user_id).normal(size=_DIM)
        return _sigmoid(0.5 * (self._other_vectors(name) @ guess))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one world per process
    def _other_vectors(self, name: str) -> Floats:
        noise = _rng("other", self.seed, name).normal(size=self.vectors.shape)
        vectors: Floats = self.vectors + 0.2 * noise
        return vectors

    def utility(self, user: User) -> Floats:
        """The user's true utility for every item: what an oracle would rank by."""
        utility: Floats = self.vectors @ user.taste + self.pull
        return utility

    @functools.lru_cache(maxsize=_CACHED_RANKINGS)  # noqa: B019 - one world per process
    def _ranking(self, name: str, user_id: str | None) -> tuple[npt.NDArray[np.int16], Floats]:
        # Kept as small arrays (about 1 KB), so the cache holds every user a benchmark cycles
        # through without growing the mock to hundreds of megabytes.
        user = self.user(user_id)
        scores = self.scores(name, user)
        order = _best_unseen(scores, user, MAX_RESULTS)
        return order.astype(np.int16), np.round(scores[order], 4)

    def ranking(self, name: str, user_id: str | None, size: int) -> list[dict[str, Any]]:
        """The top `size` (at most `MAX_RESULTS`) items `name` recommends to `user_id`."""
        if not 1 <= size <= MAX_RESULTS:
            raise ValueError(f"size must be from 1 to {MAX_RESULTS}")
        order, scores = self._ranking(name, user_id)
        ids, values = order[:size].tolist(), scores[:size].tolist()
        return [{"id": _IDS[i], "score": s} for i, s in zip(ids, values, strict=True)]

    def oracle(self, user_id: str | None, size: int) -> list[str]:
        """The `size` items of highest true utility the user does not have: the ceiling."""
        user = self.user(user_id)
        return [_IDS[i] for i in _best_unseen(self.utility(user), user, size)]

    def truth(self, user_id: str | None) -> list[str]:
        """The user's held-out items, best first: the ranking quality is measured against."""
        return [_IDS[i] for i in self.user(user_id).truth]

    def history(self, user_id: str | None) -> list[str]:
        """The items the user already has, which no recommender recommends."""
        return [_IDS[i] for i in self.user(user_id).history]


def _best_unseen(scores: Floats, user: User, size: int) -> Ints:
    """Indices of the `size` best `scores` outside the user's history, best first."""
    scores = scores.copy()
    scores[user.history] = -np.inf
    top = np.argpartition(-scores, size)[:size]
    # Best score first; equal scores by item index, so the order never depends on chance.
    order: Ints = top[np.lexsort((top, -scores[top]))]
    return order


def _sigmoid(x: Floats) -> Floats:
    result: Floats = 1.0 / (1.0 + np.exp(-x))
    return result


def default_world(seed: int = DEFAULT_SEED) -> World:
    """The world for `seed`, built once per process (about a fifth of a second)."""
    # Keyed on the seed alone: `default_world()` and `default_world(DEFAULT_SEED)` must share
    # one world, not build two (functools.cache keys on how the arguments were passed).
    return _world(seed)


@functools.cache
def _world(seed: int) -> World:
    return World(seed)
