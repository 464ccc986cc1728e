"""Simulated users clicking on what they are shown: two click models of the world's users.

Both share one user: how much an item *attracts* them once they look at it, and whether they
are engaged with an impression at all. They differ in which items the user looks at.

**Attraction.** An examined item is clicked with a probability that grows with how much the
user really likes it::

    attraction = sigmoid(slope · (z - threshold))

where z is the item's true utility for the user (`World.utility`) standardised over the whole
catalogue for that user: how far above the user's own average the item is, in the user's own
standard deviations. Held-out truth items are drawn from the top of the same utility, so they
are the likeliest clicks, and a list that ranks them high (good NDCG against the truth) draws
more clicks on average; no click ever depends on the truth directly.

**Position-based** (`PositionBasedModel`, ``"pbm"``; Craswell, Zoeter, Taylor & Ramsey, "An
experimental comparison of click position-bias models", WSDM 2008; Chuklin, Markov & de Rijke,
*Click Models for Web Search*, 2015, ch. 3): the item at rank r is *examined* with probability
``1 / r^eta``, whatever the items above it were, and clicked independently of the others::

    P(click at rank r) = 1 / r^eta  ·  attraction_r

**Cascade** (`CascadeModel`, ``"cascade"``; the cascade model of Craswell et al. 2008, and
with a continuation probability after a click the dependent click model of Guo, Liu & Wang,
WSDM 2009; Chuklin et al. ch. 3): the user scans the list top-down, always examining the first
item; at each examined item they click with its attraction; after a click they stop,
satisfied, or go on with probability `continue_after_click` (0, the classic cascade: at most
one click); an item not clicked sends them on to the next; the list's end stops them::

    P(examine rank 1) = 1
    P(examine rank r + 1) = P(examine rank r) · (1 - attraction_r · (1 - continue_after_click))
    P(click at rank r) = P(examine rank r) · attraction_r

So an item's clicks depend on the items above it: a good item above takes the clicks of those
below, the way a user who found what they wanted leaves the list.

Users differ in how much they click (`activity`, off by default): with it, each user has an
*engagement* probability drawn once from a Beta distribution, and on each impression the user
is engaged with that probability, clicking as their model says, or else clicks nothing,
whatever the list. Most users are then rarely engaged and a few often: the heavy tail of
clicks per user that real logs show, and the many impressions without a click (a
recommender's CTR per impression is a few percent, not the ~65% of the models alone). Without
it every user is always engaged: all users click alike.

Clicks are seeded and deterministic per (world seed, user, list shown, occasion): the same
user shown the same list on the same occasion clicks the same items, in every process. Both
models read the same uniform draws, one per rank, to decide a click there (an item is
attractive to the user on this showing when its draw is below its attraction), so a cascade
user's clicks are the first of those a position-based user without position bias (`eta` 0)
makes, or all of them when they always go on (`continue_after_click` 1).

`ClickModel.named("pbm" | "cascade", world, ...)` builds one by name (`CLICK_MODELS`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from mock_recommenders.world import CATALOGUE_SIZE, World

__all__ = ["CLICK_MODELS", "CascadeModel", "ClickModel", "PositionBasedModel"]

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ClickModel(ABC):
    """Who clicks what, for the users of `world`: what both click models share.

    `threshold` is the standardised utility an examined item is clicked half the time at, and
    `slope` how sharply attraction rises around it. `activity`: the (a, b) of the Beta
    distribution each user's engagement probability is drawn from; None: always engaged.
    A model says which items the user examines (`examined`) and, given the draws, which they
    click (`scan`); see the module docstring.
    """

    name: ClassVar[str]

    world: World
    _: KW_ONLY
    threshold: float = 2.5
    slope: float = 2.0
    activity: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.slope < 0 or not math.isfinite(self.threshold):
            raise ValueError(
                f"need slope >= 0 and a finite threshold, got {self.slope}, {self.threshold}"
            )
        if self.activity is not None and not all(
            math.isfinite(shape) and shape > 0 for shape in self.activity
        ):
            raise ValueError(f"activity needs two Beta shapes above 0, got {self.activity}")

    @staticmethod
    def named(name: str, world: World, **settings: Any) -> ClickModel:
        """The click model called `name` (a key of `CLICK_MODELS`), with these settings."""
        try:
            kind = CLICK_MODELS[name]
        except KeyError:
            raise ValueError(
                f"no click model {name!r}; the click models are {sorted(CLICK_MODELS)}"
            ) from None
        return kind(world, **settings)

    def engagement(self, user_id: str | None) -> float:
        """The probability that the user engages with an impression at all (1: always)."""
        if self.activity is None:
            return 1.0
        key = "\x1f".join(["engagement", str(self.world.seed), repr(user_id)])
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        a, b = self.activity
        return float(np.random.Generator(np.random.Philox(seed)).beta(a, b))

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

    @abstractmethod
    def examined(self, attraction: Sequence[float]) -> list[float]:
        """For each rank of a list with these attractions, the probability it is examined."""

    @abstractmethod
    def scan(self, attraction: Sequence[float], draws: Floats) -> list[int]:
        """The ranks (from 0) clicked in a list with these attractions, given the user's draws.

        `draws` holds two uniform draws per rank: ``draws[0][r]`` below ``attraction[r]``
        means the item at r attracts the user this time; ``draws[1][r]`` decides whether a
        user who clicked it goes on down the list (a cascade's choice).
        """

    def click_probabilities(self, user_id: str | None, item_ids: Sequence[str]) -> list[float]:
        """For each item of the list shown (best first), the probability that it is clicked.

        Over the user's engagement too; the clicks of one impression are not independent
        then (an unengaged user clicks none).
        """
        engaged = self.engagement(user_id)
        attraction = self.attraction(user_id, item_ids)
        return [
            engaged * examined * attracted
            for examined, attracted in zip(self.examined(attraction), attraction, strict=True)
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
        shown = key + "\x1e" + "\x1f".join(item_ids)
        draws = np.vstack(
            [_uniforms(shown, len(item_ids)), _uniforms(shown + "\x1econtinue", len(item_ids))]
        )
        return [item_ids[rank] for rank in self.scan(self.attraction(user_id, item_ids), draws)]

    def _standardised(self, user_id: str | None) -> Floats:
        return _standardised_utility(self.world, user_id)


@dataclass(frozen=True)
class PositionBasedModel(ClickModel):
    """The position-based model: rank r examined with probability ``1 / r^eta``, whatever is above.

    `eta` sets the position bias (0: none; 1: rank 10 is examined a tenth as often as rank 1).
    """

    name: ClassVar[str] = "pbm"

    _: KW_ONLY
    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta < 0:
            raise ValueError(f"need eta >= 0, got {self.eta}")

    def examination(self, rank: int) -> float:
        """The probability that the item at `rank` (from 1) is looked at."""
        if rank < 1:
            raise ValueError(f"ranks start at 1, got {rank}")
        return float(rank**-self.eta)

    def examined(self, attraction: Sequence[float]) -> list[float]:
        """``1 / r^eta`` at each rank r: the attractions do not matter."""
        return [self.examination(rank) for rank in range(1, len(attraction) + 1)]

    def scan(self, attraction: Sequence[float], draws: Floats) -> list[int]:
        """Each rank on its own: clicked when examined and attractive."""
        chance = [e * a for e, a in zip(self.examined(attraction), attraction, strict=True)]
        return [rank for rank, (p, u) in enumerate(zip(chance, draws[0], strict=True)) if u < p]


@dataclass(frozen=True)
class CascadeModel(ClickModel):
    """The cascade model: top-down until a click satisfies the user, or the list ends.

    `continue_after_click`: the probability that a user goes on down the list after a click
    (0: the classic cascade, one click at most; 1: on to the end, clicking every attractive
    item).
    """

    name: ClassVar[str] = "cascade"

    _: KW_ONLY
    continue_after_click: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.continue_after_click <= 1.0:
            raise ValueError(
                f"need 0 <= continue_after_click <= 1, got {self.continue_after_click}"
            )

    def examined(self, attraction: Sequence[float]) -> list[float]:
        """Rank 1 always; each rank below as often as the user got past the one above."""
        reached, chances = 1.0, []
        for attracted in attraction:
            chances.append(reached)
            reached *= 1.0 - attracted * (1.0 - self.continue_after_click)
        return chances

    def scan(self, attraction: Sequence[float], draws: Floats) -> list[int]:
        """Down the list, clicking each attractive item, stopping after a click unless going on."""
        clicked = []
        for rank, attracted in enumerate(attraction):
            if draws[0][rank] < attracted:
                clicked.append(rank)
                if draws[1][rank] >= self.continue_after_click:
                    break
        return clicked


CLICK_MODELS: dict[str, type[ClickModel]] = {
    model.name: model for model in (PositionBasedModel, CascadeModel)
}


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
