"""The trained ALS model as both servers load it: one .npz file, ranked with numpy alone.

The file holds the item ids and factors, the user ids and factors, each trained user's
history (as CSR: `history_indptr`, `history_items`) and the items by popularity. A known user
is ranked by the dot product of their factors with every item's; an unknown or absent user
gets the most popular items instead. No item in a user's history is ever ranked, as the mock
recommenders never rank one either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_RESULT_SIZE",
    "MAX_RESULT_SIZE",
    "MODEL_CACHE",
    "MODEL_VARIABLE",
    "ALSModel",
    "Ranking",
    "default_path",
    "result_size",
]

ROOT = Path(__file__).resolve().parent.parent.parent
MODEL_CACHE = ROOT / ".cache" / "models"
# Where the servers find the artefact when none is named on their command line.
MODEL_VARIABLE = "FUSION_ALS_MODEL"
DEFAULT_RESULT_SIZE = 10
# The mocks' limit too (`mock_recommenders.world.MAX_RESULTS`).
MAX_RESULT_SIZE = 100


def default_path(seed: int = 2026) -> Path:
    """Where `make model-servers` writes the model trained on the world of `seed`."""
    named = os.environ.get(MODEL_VARIABLE)
    return Path(named) if named else MODEL_CACHE / f"als-{seed}.npz"


def result_size(value: object) -> int:
    """A requested list length as an int from 1 to `MAX_RESULT_SIZE`; ValueError if it is none.

    Larger requests are capped rather than refused, as the mocks serve at most 100 too.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"the result size must be an integer, not {value!r}")
    if value < 1:
        raise ValueError(f"the result size must be at least 1, not {value}")
    return min(int(value), MAX_RESULT_SIZE)


@dataclass(frozen=True)
class Ranking:
    """A ranked list: item ids and their scores, best first."""

    item_ids: list[str]
    scores: npt.NDArray[np.float32]


class ALSModel:
    """The artefact loaded into memory, ranking items for a user."""

    def __init__(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            self.item_ids: npt.NDArray[np.str_] = data["item_ids"]
            self.item_factors: npt.NDArray[np.float32] = data["item_factors"]
            user_ids = data["user_ids"]
            self.user_factors: npt.NDArray[np.float32] = data["user_factors"]
            self._indptr: npt.NDArray[np.int64] = data["history_indptr"]
            self._history: npt.NDArray[np.int32] = data["history_items"]
            self._popularity: npt.NDArray[np.float32] = data["popularity"]
            self.seed = int(data["seed"])
        self._users = {str(user): row for row, user in enumerate(user_ids.tolist())}
        # Popularity ranks: the fallback's scores, the share of the most popular item's count.
        self._popular_order = np.lexsort((np.arange(len(self.item_ids)), -self._popularity))

    def knows(self, user_id: str | None) -> bool:
        """Whether `user_id` was trained on (else it gets the popularity fallback)."""
        return user_id is not None and user_id in self._users

    def history(self, user_id: str | None) -> list[str]:
        """The items a trained user already has; none for any other."""
        if user_id is None or user_id not in self._users:
            return []
        row = self._users[user_id]
        return [
            str(i) for i in self.item_ids[self._history[self._indptr[row] : self._indptr[row + 1]]]
        ]

    def recommend(self, user_id: str | None, size: int) -> Ranking:
        """The `size` best items for `user_id` outside their history, best first."""
        size = result_size(size)
        if user_id is None or user_id not in self._users:
            top = self._popular_order[:size]
            return Ranking([str(i) for i in self.item_ids[top]], self._popularity[top])
        row = self._users[user_id]
        scores = self.item_factors @ self.user_factors[row]
        scores[self._history[self._indptr[row] : self._indptr[row + 1]]] = -np.inf
        top = np.argpartition(-scores, size)[:size]
        # Best first; equal scores by item index, so the order never depends on chance.
        top = top[np.lexsort((top, -scores[top]))]
        return Ranking([str(i) for i in self.item_ids[top]], scores[top].astype(np.float32))
