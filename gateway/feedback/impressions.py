"""Impressions: what one answer showed, to whom (hashed), and who gets credit for a click.

An `Impression` is recorded per /recommendation answer with feedback on: the request id, a
salted hash of the user (`hash_user`; the raw user id is never kept), the time, the fusion and
experiment arm used, and each shown item with its provenance: the team that placed it under
team-draft interleaving, else the recommenders whose lists held it, with their ranks.

`credit_for` is the one credit rule both feedback stores apply: a positive event on an item
credits its team, or else its sources in equal shares. `assign_arm` splits users between
experiment arms by a stable hash of the user hash, so a user stays in one arm across requests,
processes and gateway instances.

The JSON form (`Impression.to_json`) is compact, with one-letter keys, because one is stored
per answer; the Redis store's Lua script reads the same form, so its keys are fixed here. No
`Impression` is built per answer: `EncodedImpression.of_answer` makes that JSON straight from
the answer's fused items in one pydantic-core call, and the stores take either
(`StorableImpression`). Judging an event does not build one either: `ShownItems` reads the
stored JSON once and checks only the fields an event uses, and the item it names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeGuard, get_args

import pydantic_core

__all__ = [
    "POSITIVE_EVENTS",
    "USER_HASH_LENGTH",
    "EncodedImpression",
    "EventKind",
    "FeedbackEvent",
    "Impression",
    "ShownItem",
    "ShownItems",
    "StorableImpression",
    "assign_arm",
    "credit_for",
    "hash_user",
    "is_event_kind",
]

EventKind = Literal["click", "purchase", "dismiss"]
# The events that credit recommenders; a dismiss is counted but credits nobody.
POSITIVE_EVENTS: Final[frozenset[str]] = frozenset({"click", "purchase"})
# 128 bits of the HMAC: ample against collisions among users, short enough to store per answer.
USER_HASH_LENGTH: Final = 32


def is_event_kind(value: object) -> TypeGuard[EventKind]:
    """Whether `value` is one of the event kinds ("click", "purchase", "dismiss")."""
    return isinstance(value, str) and value in get_args(EventKind)


@dataclass(frozen=True, slots=True)
class ShownItem:
    """One item of an answer: its id, its position (from 1), and who placed it there.

    `team` is the recommender whose turn placed the item under team-draft interleaving, None
    for other fusions; `sources` are `(recommender, rank)` for every list that held it.
    """

    item_id: str
    position: int
    team: str | None
    sources: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Impression:
    """What one answer showed: request id, hashed user, time (unix s), fusion, arm, items."""

    request_id: str
    user_hash: str
    at: float
    fusion: str
    arm: str | None
    items: tuple[ShownItem, ...]

    def item(self, item_id: str) -> ShownItem | None:
        """The shown item with id `item_id`, or None if this answer did not show it."""
        for shown in self.items:
            if shown.item_id == item_id:
                return shown
        return None

    def teams(self) -> tuple[str, ...]:
        """The interleaving teams that placed items here, sorted; empty for other fusions."""
        return tuple(sorted({shown.team for shown in self.items if shown.team is not None}))

    def recommenders(self) -> tuple[str, ...]:
        """Every recommender in this impression, as a team or a source of a shown item, sorted."""
        names = {name for shown in self.items for name, _rank in shown.sources}
        names.update(shown.team for shown in self.items if shown.team is not None)
        return tuple(sorted(names))

    def to_json(self) -> str:
        """The compact JSON form: `{"r","u","t","f","a","i": [[id, position, team, sources]]}`."""
        body = {
            "r": self.request_id,
            "u": self.user_hash,
            "t": self.at,
            "f": self.fusion,
            "a": self.arm,
            "i": [
                [shown.item_id, shown.position, shown.team, [list(s) for s in shown.sources]]
                for shown in self.items
            ],
        }
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Impression:
        """The impression `to_json` wrote; ValueError naming the field for anything else."""
        body = json.loads(text)
        if not isinstance(body, dict):
            raise ValueError("an impression is a JSON object")
        at = body.get("t")
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise ValueError("impression field 't' (time) must be a finite number")
        items = body.get("i")
        if not isinstance(items, list):
            raise ValueError("impression field 'i' (items) must be a list")
        return cls(
            request_id=_text(body, "r"),
            user_hash=_text(body, "u"),
            at=float(at),
            fusion=_text(body, "f"),
            arm=_optional_text(body.get("a"), "a"),
            items=tuple(_shown_item(entry) for entry in items),
        )


class ShownItems:
    """A stored impression read back to judge events on it: its arm, its teams, its items.

    What `Impression.from_json` would give an event, for a fraction of its cost: `body` is the
    parsed JSON (`from_json` parses it), and only the fields an event uses are checked, the
    item it names when it names it. ValueError, naming the field, for a form `to_json` never
    wrote.
    """

    __slots__ = ("_entries", "arm")

    def __init__(self, body: object):
        if not isinstance(body, dict):
            raise ValueError("an impression is a JSON object")
        entries = body.get("i")
        if not isinstance(entries, list) or not all(
            isinstance(entry, list) and len(entry) == 4 for entry in entries
        ):
            raise ValueError(
                "impression field 'i' (items) must be a list of [id, position, team, sources]"
            )
        self.arm = _optional_text(body.get("a"), "a")
        self._entries: list[list[Any]] = entries

    @classmethod
    def from_json(cls, text: str | bytes) -> ShownItems:
        """The items of the impression `Impression.to_json` wrote as `text`."""
        return cls(pydantic_core.from_json(text))

    def item(self, item_id: str) -> ShownItem | None:
        """The shown item with id `item_id`, or None if this answer did not show it."""
        for entry in self._entries:
            if entry[0] == item_id:
                return _shown_item(entry)
        return None

    def teams(self) -> tuple[str, ...]:
        """The interleaving teams that placed items here, sorted; empty for other fusions."""
        teams = {entry[2] for entry in self._entries}
        teams.discard(None)
        if not all(isinstance(team, str) for team in teams):
            raise ValueError("impression field 'team' must be a string or null")
        return tuple(sorted(teams))


class StorableImpression(Protocol):
    """What a feedback store needs of an impression to save it: an `Impression`, or the
    `EncodedImpression` that `FeedbackService.record` makes of each answer."""

    @property
    def request_id(self) -> str:
        """The answer's request id."""
        ...

    @property
    def at(self) -> float:
        """When it was shown, unix seconds."""
        ...

    @property
    def arm(self) -> str | None:
        """The experiment arm, None outside the experiment."""
        ...

    def to_json(self) -> str:
        """The compact JSON form (`Impression.to_json`)."""
        ...

    def recommenders(self) -> tuple[str, ...]:
        """Every recommender in it, as a team or a source of a shown item, sorted."""
        ...


@dataclass(frozen=True, slots=True)
class EncodedImpression:
    """An impression in its stored form: `Impression.to_json`'s JSON, and whom it counts for.

    Made by `of_answer` straight from the answer's fused items (`FusedRanking.items`), with
    no `ShownItem` built: this runs on the event loop for every answer shown.
    `Impression.from_json(body)` is the impression.
    """

    request_id: str
    at: float
    arm: str | None
    body: str
    names: tuple[str, ...]

    @classmethod
    def of_answer(
        cls,
        request_id: str,
        user_hash: str,
        at: float,
        fusion: str,
        arm: str | None,
        items: Sequence[dict[str, Any]],
        teams: Sequence[str | None],
    ) -> EncodedImpression:
        """The stored form of one answer: `items` as `Fuser.fuse` made them, each `{"id",
        "sources": [{"name", "rank", ...}]}`, placed by `teams` (None for each, but under
        interleaving)."""
        # List comprehensions and one encoder call: 15-18 µs for ten items.
        shown = [
            [item["id"], position, team, [[s["name"], s["rank"]] for s in item["sources"]]]
            for position, (item, team) in enumerate(zip(items, teams, strict=True), start=1)
        ]
        body = {"r": request_id, "u": user_hash, "t": at, "f": fusion, "a": arm, "i": shown}
        names = {s["name"] for item in items for s in item["sources"]}
        names.update(team for team in teams if team is not None)
        return cls(request_id, at, arm, pydantic_core.to_json(body).decode(), tuple(sorted(names)))

    def to_json(self) -> str:
        """The compact JSON form, as `Impression.to_json` writes it."""
        return self.body

    def recommenders(self) -> tuple[str, ...]:
        """Every recommender in it, as a team or a source of a shown item, sorted."""
        return self.names


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """A user's event on a shown item; `event_id`, when given, makes a retry count once."""

    request_id: str
    item_id: str
    event: EventKind
    event_id: str | None = None


def hash_user(user_id: str, salt: str | bytes) -> str:
    """The user's pseudonym: HMAC-SHA256 of `user_id` keyed by `salt`, hex, 32 characters.

    Keyed rather than a plain hash so that nobody holding the store but not the salt can
    confirm a guessed user id.
    """
    if not salt:
        raise ValueError("hash_user needs a non-empty salt: an unsalted hash is a guessable id")
    key = salt.encode() if isinstance(salt, str) else salt
    digest = hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()
    return digest[:USER_HASH_LENGTH]


def assign_arm(user_hash: str, arms: Sequence[tuple[str, float]]) -> str:
    """The arm for this user: a stable point in [0, 1) cut by the arms' cumulative shares.

    The point is a hash of the user hash alone, so it is the same on every instance and every
    request (sticky), and users spread over the arms in proportion to their shares (which need
    not sum to 1; they are normalised). Zero-share arms get nobody.
    """
    if not arms:
        raise ValueError("assign_arm needs at least one arm")
    names = [name for name, _share in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    if any(not math.isfinite(share) or share < 0 for _name, share in arms):
        raise ValueError(f"arm shares must be finite and non-negative, got {list(arms)}")
    total = sum(share for _name, share in arms)
    if total <= 0:
        raise ValueError("at least one arm must have a positive share")
    # A domain prefix keeps this point independent of any other use of the same hash.
    digest = hashlib.sha256(b"fusion-gateway/arm\x00" + user_hash.encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * total
    cumulative = 0.0
    for name, share in arms:
        cumulative += share
        if point < cumulative:
            return name
    # Rounding in the running sum can leave the last sliver unassigned: it is the last arm's.
    return next(name for name, share in reversed(arms) if share > 0)


def credit_for(item: ShownItem) -> dict[str, float]:
    """Who a positive event on `item` credits: its team wholly, else its sources equally.

    Under interleaving the team that placed an item is the one whose choice the click
    rewards; under score fusions every list that held the item contributed to its place, and
    splitting one unit keeps each click worth one credit in total.
    """
    if item.team is not None:
        return {item.team: 1.0}
    if not item.sources:
        return {}
    share = 1.0 / len(item.sources)
    credit: dict[str, float] = {}
    for name, _rank in item.sources:
        credit[name] = credit.get(name, 0.0) + share
    return credit


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ValueError(f"impression field {key!r} must be a string")
    return value


def _optional_text(value: object, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"impression field {key!r} must be a string or null")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown_item(entry: object) -> ShownItem:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise ValueError("each impression item is [item_id, position, team, sources]")
    item_id, position, team, sources = entry
    if not isinstance(item_id, str) or not _is_int(position):
        raise ValueError("an impression item's id must be a string and its position an int")
    if not isinstance(sources, list) or not all(
        isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and _is_int(s[1])
        for s in sources
    ):
        raise ValueError("an impression item's sources must be [[recommender, rank], ...]")
    return ShownItem(
        item_id, position, _optional_text(team, "team"), tuple((s[0], s[1]) for s in sources)
    )
