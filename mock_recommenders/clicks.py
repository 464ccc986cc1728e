"""Simulated users clicking on what they are shown: a position-biased click model of the world.

A position-based model (Craswell et al., WSDM 2008; Chuklin, Markov & de Rijke, *Click Models
for Web Search*, 2015): an item at rank r is *examined* with probability ``1 / r^eta``, and an
examined item is *clicked* with a probability that grows with how much the user really likes
it, independently of the other items::

    P(click at rank r) = 1 / r^eta  ·  sigmoid(slope · (z - threshold))

where z is the item's true utility for the user (`World.utility`) standardised over the whole
catalogue for that user: how far above the user's own average the item is, in the user's own
standard deviations. Held-out truth items are drawn from the top of the same utility, so they
are the likeliest clicks, and a list that ranks them high (good NDCG against the truth) draws
more clicks on average; no click ever depends on the truth directly.

Users differ in how much they click (`activity`, off by default): with it, each user has an
*engagement* probability drawn once from a Beta distribution, and on each impression the user
is engaged with that probability, clicking as above, or else clicks nothing, whatever the
list. Most users are then rarely engaged and a few often: the heavy tail of clicks per user
that real logs show, and the many impressions without a click (a recommender's CTR per
impression is a few percent, not the ~65% of the model above alone). Without it every user
is always engaged: all users click alike.

Clicks are seeded and deterministic per (world seed, user, list shown, occasion): the same
user shown the same list on the same occasion clicks the same items, in every process.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mock_recommenders.world import CATALOGUE_SIZE, World

__all__ = ["ClickModel"]

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ClickModel:
    """Who clicks what, for the users of `world`; see the module docstring for the model.

    `eta` sets the position bias (0: none; 1: rank 10 is examined a tenth as often as rank 1),
    `threshold` the standardised utility an examined item is clicked half the time at, and
    `slope` how sharply attraction rises around it. `activity`: the (a, b) of the Beta
    distribution each user's engagement probability is drawn from; None: always engaged.
    """

    world: World
    eta: float = 1.0
    threshold: float = 2.5
    slope: float = 2.0
    activity: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.eta < 0 or self.slope < 0 or not math.isfinite(self.threshold):
            raise ValueError(
                f"need eta >= 0, slope >= 0 and a finite threshold, got {self.eta}, "
                f"{self.slope}, {self.threshold}"
            )
        if self.activity is not None and not all(
            math.isfinite(shape) and shape > 0 for shape in self.activity
        ):
            raise ValueError(f"activity needs two Beta shapes above 0, got {self.activity}")

    def engagement(self, user_id: str | None) -> float:
        """The probability that the user engages with an impression at all (1: always)."""
        if self.activity is None:
            return 1.0
        key = "\x1f".join(["engagement", str(self.world.seed), repr(user_id)])
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        a, b = self.activity
        return float(np.random.Generator(np.random.Philox(seed)).beta(a, b))

    def examination(self, rank: int) -> float:
        """The probability that the item at `rank` (from 1) is looked at."""
        if rank < 1:
            raise ValueError(f"ranks start at 1, got {rank}")
        return float(rank**-self.eta)

    def attraction(self, user_id: str | None, item_ids: Sequence[str]) -> list[float]:
        """For each item, the probability that the user clicks it once they have examined it.

        An id outside the catalogue attracts nobody.
        """
        z = self._standardised(user_id)
        found = [_index(item_id) for item_id in item_ids]
        return [
            0.0 if index is None else _sigmoid(self.slope * (float(z[index]) - self.threshold))
            for index in found
        ]

    def click_probabilities(self, user_id: str | None, item_ids: Sequence[str]) -> list[float]:
        """For each item of the list shown (best first), the probability that it is clicked.

        Over the user's engagement too; the clicks of one impression are not independent
        then (an unengaged user clicks none).
        """
        engaged = self.engagement(user_id)
        return [
            engaged * self.examination(rank) * attraction
            for rank, attraction in enumerate(self.attraction(user_id, item_ids), start=1)
        ]

    def expected_clicks(self, user_id: str | None, item_ids: Sequence[str]) -> float:
        """The mean number of clicks the list draws from the user."""
        return math.fsum(self.click_probabilities(user_id, item_ids))

    def clicks(
        self, user_id: str | None, item_ids: Sequence[str], occasion: object = None
    ) -> list[str]:
        """The items the user clicks, in list order; the same for the same arguments.

        `occasion` tells one showing of the same list to the same user from another (a
        simulation's impression number, say); None for a single showing.
        """
        key = "\x1f".join(["clicks", str(self.world.seed), repr(user_id), repr(occasion)])
        if self.activity is not None:
            (draw,) = _uniforms(key + "\x1eengaged", 1)
            if draw >= self.engagement(user_id):
                return []
        chance = [
            self.examination(rank) * attraction
            for rank, attraction in enumerate(self.attraction(user_id, item_ids), start=1)
        ]
        draws = _uniforms(key + "\x1e" + "\x1f".join(item_ids), len(item_ids))
        return [item for item, p, u in zip(item_ids, chance, draws, strict=True) if u < p]

    def _standardised(self, user_id: str | None) -> Floats:
        return _standardised_utility(self.world, user_id)


@functools.lru_cache(maxsize=4096)
def _standardised_utility(world: World, user_id: str | None) -> Floats:
    utility = world.utility(world.user(user_id))
    spread = float(utility.std())
    z: Floats = (utility - utility.mean()) / (spread if spread > 0 else 1.0)
    return z


def _uniforms(key: str, count: int) -> Floats:
    # blake2b, not hash(): Python salts hash() per process, and clicks must repeat everywhere.
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    draws: Floats = np.random.Generator(np.random.Philox(seed)).random(count)
    return draws


def _index(item_id: str) -> int | None:
    if not item_id.startswith("i") or not item_id[1:].isdigit():
        return None
    index = int(item_id[1:])
    # "i012" is not "i12": only the world's own spelling of an id names its item.
    return index if index < CATALOGUE_SIZE and item_id == f"i{index}" else None


def _sigmoid(x: float) -> float:
    # Split by sign so neither branch overflows exp().
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
