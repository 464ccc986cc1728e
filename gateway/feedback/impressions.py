"""Impressions: what one answer showed, and who gets credit for a click on each item.

An impression is recorded per /recommendation answer with feedback on. What a store keeps of
it is its *record*: what judging an event needs and nothing more. Its request id and time are
the store's key and column (or TTL), not repeated in the record; the user, the fusion and the
recommenders' ranks are not kept at all (the user's salted hash, `hash_user`, only decides the
experiment arm, when the answer is made). The record is compact JSON::

    [2, arm, [name, ...], [[item_id, sources], [item_id, sources, team], ...]]

`2` is the form's version; `arm` the experiment arm or null; the names are every recommender
in the answer, sorted, once; then the shown items in the order shown (position = index + 1),
each with its `sources`, the recommenders whose lists held it, as a bit mask over the names
(bit i is names[i]; a list of indexes instead when an answer has more than 52 names, past
what a double, Lua's number, holds exactly), and `team`, the index of the recommender whose
turn placed it under team-draft interleaving, absent for other fusions. Ten items from four
recommenders take about 190 bytes, a third of the form before (version 1, a JSON object that
repeated the request id, the time, the user hash, the fusion and every source's name and rank
in every item); `ShownItems` still reads that form, so stores written before keep working.

`credit_for` is the one credit rule both feedback stores apply: a positive event on an item
credits its team, or else its sources in equal shares. `assign_arm` splits users between
experiment arms by a stable hash of the user hash, so a user stays in one arm across requests,
processes and gateway instances.

`Impression` is an answer as a value (tests, tools); `EncodedImpression.of_answer` makes the
record straight from the answer's fused items on the event loop, building no `Impression`.
Judging an event does not build one either: `ShownItems` reads a record once and checks only
the fields an event uses, and the item it names. The Redis store's Lua script reads the same
forms, so they are fixed here.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeGuard, get_args

import pydantic_core

__all__ = [
    "POSITIVE_EVENTS",
    "RECORD_VERSION",
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
    "encode_record",
    "hash_user",
    "is_event_kind",
]

EventKind = Literal["click", "purchase", "dismiss"]
# The events that credit recommenders; a dismiss is counted but credits nobody.
POSITIVE_EVENTS: Final[frozenset[str]] = frozenset({"click", "purchase"})
# 128 bits of the HMAC: ample against collisions among users.
USER_HASH_LENGTH: Final = 32
# The record's form: 2 is the compact array; 1 (a JSON object) is still read.
RECORD_VERSION: Final = 2
# Sources are a bit mask while every bit fits a double's 53-bit mantissa (Lua's numbers).
_MASK_NAMES: Final = 52


def is_event_kind(value: object) -> TypeGuard[EventKind]:
    """Whether `value` is one of the event kinds ("click", "purchase", "dismiss")."""
    return isinstance(value, str) and value in get_args(EventKind)


@dataclass(frozen=True, slots=True)
class ShownItem:
    """One item of an answer: its id, its position (from 1), and who placed it there.

    `team` is the recommender whose turn placed the item under team-draft interleaving, None
    for other fusions; `sources` are the recommenders whose lists held it, sorted.
    """

    item_id: str
    position: int
    team: str | None
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Impression:
    """What one answer showed: its request id, when (unix s), the arm, and the items."""

    request_id: str
    at: float
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
        names = {name for shown in self.items for name in shown.sources}
        names.update(shown.team for shown in self.items if shown.team is not None)
        return tuple(sorted(names))

    def to_json(self) -> str:
        """The record a store keeps (the module docstring's form)."""
        body, _names = encode_record(
            self.arm, ((shown.item_id, shown.team, shown.sources) for shown in self.items)
        )
        return body


def encode_record(
    arm: str | None, items: Iterable[tuple[str, str | None, Iterable[str]]]
) -> tuple[str, tuple[str, ...]]:
    """The record of an answer's `items`, each `(item_id, team, sources)` in the order shown,
    and every recommender in it, sorted."""
    shown = [(item_id, team, set(sources)) for item_id, team, sources in items]
    names = {name for _id, _team, sources in shown for name in sources}
    names.update(team for _id, team, _sources in shown if team is not None)
    order = tuple(sorted(names))
    index = {name: i for i, name in enumerate(order)}
    wide = len(order) > _MASK_NAMES
    rows: list[list[Any]] = []
    for item_id, team, sources in shown:
        bits = sorted(index[name] for name in sources)
        held: int | list[int] = bits if wide else sum(1 << bit for bit in bits)
        rows.append([item_id, held] if team is None else [item_id, held, index[team]])
    body = [RECORD_VERSION, arm, order, rows]
    return pydantic_core.to_json(body).decode(), order


class ShownItems:
    """A stored record read back to judge events on it: its arm, its teams, its items.

    `body` is the parsed JSON (`from_json` parses it), in either form (the module
    docstring), and only the fields an event uses are checked, the item it names when it
    names it. ValueError, naming the field, for a form no gateway wrote.
    """

    __slots__ = ("_entries", "_names", "arm")

    def __init__(self, body: object):
        if isinstance(body, dict):  # version 1: {"a": arm, "i": [[id, position, team, sources]]}
            self.arm = _optional_text(body.get("a"), "a")
            entries = body.get("i")
            if not isinstance(entries, list) or not all(
                isinstance(entry, list) and len(entry) == 4 for entry in entries
            ):
                raise ValueError(
                    "impression field 'i' (items) must be a list of [id, position, team, sources]"
                )
            self._names: list[Any] | None = None
        elif isinstance(body, list) and len(body) == 4 and body[0] == RECORD_VERSION:
            _version, arm, names, entries = body
            self.arm = _optional_text(arm, "arm")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("impression record's names must be a list of strings")
            if not isinstance(entries, list) or not all(
                isinstance(entry, list) and len(entry) in (2, 3) for entry in entries
            ):
                raise ValueError(
                    "impression record's items must be a list of [id, sources] or "
                    "[id, sources, team]"
                )
            self._names = names
        else:
            raise ValueError(
                f"an impression record is [{RECORD_VERSION}, arm, names, items] "
                "(or a version 1 JSON object)"
            )
        self._entries: list[list[Any]] = entries

    @classmethod
    def from_json(cls, text: str | bytes) -> ShownItems:
        """The items of the record `text` (`Impression.to_json`, `EncodedImpression`)."""
        return cls(pydantic_core.from_json(text))

    def item(self, item_id: str) -> ShownItem | None:
        """The shown item with id `item_id`, or None if this answer did not show it."""
        for position, entry in enumerate(self._entries, start=1):
            if entry[0] == item_id:
                if self._names is None:
                    return _version_1_item(entry)
                return self._item(entry, position)
        return None

    def items(self) -> tuple[ShownItem, ...]:
        """Every shown item, in the order shown."""
        if self._names is None:
            return tuple(_version_1_item(entry) for entry in self._entries)
        return tuple(
            self._item(entry, position) for position, entry in enumerate(self._entries, start=1)
        )

    def teams(self) -> tuple[str, ...]:
        """The interleaving teams that placed items here, sorted; empty for other fusions."""
        if self._names is None:
            teams = {entry[2] for entry in self._entries}
            teams.discard(None)
            if not all(isinstance(team, str) for team in teams):
                raise ValueError("impression field 'team' must be a string or null")
            return tuple(sorted(teams))
        return tuple(
            sorted({self._name(entry[2], "team") for entry in self._entries if len(entry) == 3})
        )

    def _item(self, entry: list[Any], position: int) -> ShownItem:
        names = self._names
        assert names is not None
        held = entry[1]
        if _is_int(held) and 0 <= held < 1 << len(names):
            sources = tuple(name for bit, name in enumerate(names) if held >> bit & 1)
        elif isinstance(held, list):
            sources = tuple(self._name(index, "sources") for index in held)
        else:
            raise ValueError("impression record's sources must be a mask or a list of indexes")
        team = self._name(entry[2], "team") if len(entry) == 3 else None
        if not isinstance(entry[0], str):
            raise ValueError("impression record's item ids must be strings")
        return ShownItem(entry[0], position, team, sources)

    def _name(self, index: object, field: str) -> str:
        names = self._names
        assert names is not None
        if not _is_int(index) or not 0 <= index < len(names):
            raise ValueError(f"impression record's {field} must index its names")
        return str(names[index])


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
    """An impression in its stored form: its record (`Impression.to_json`), and whom it
    counts for.

    Made by `of_answer` straight from the answer's fused items (`FusedRanking.items`), with
    no `ShownItem` built: this runs on the event loop for every answer shown.
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
        at: float,
        arm: str | None,
        items: Sequence[dict[str, Any]],
        teams: Sequence[str | None],
    ) -> EncodedImpression:
        """The record of one answer: `items` as `Fuser.fuse` made them, each `{"id",
        "sources": [{"name", "rank", ...}]}`, placed by `teams` (None for each, but under
        interleaving)."""
        names = {source["name"] for item in items for source in item["sources"]}
        names.update(team for team in teams if team is not None)
        if len(names) > _MASK_NAMES:
            body, order = encode_record(
                arm,
                (
                    (item["id"], team, [source["name"] for source in item["sources"]])
                    for item, team in zip(items, teams, strict=True)
                ),
            )
            return cls(request_id, at, arm, body, order)
        # `encode_record`'s work, in plain loops: this runs on the event loop for every answer
        # shown (about 10 µs for ten items, one encoder call).
        order = tuple(sorted(names))
        bits = {name: 1 << index for index, name in enumerate(order)}
        rows: list[list[Any]] = []
        for item, team in zip(items, teams, strict=True):
            mask = 0
            for source in item["sources"]:
                mask |= bits[source["name"]]
            if team is None:
                rows.append([item["id"], mask])
            else:
                rows.append([item["id"], mask, bits[team].bit_length() - 1])
        body = pydantic_core.to_json([RECORD_VERSION, arm, order, rows]).decode()
        return cls(request_id, at, arm, body, order)

    def to_json(self) -> str:
        """The record, as `Impression.to_json` writes it."""
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
    sources = set(item.sources)
    if not sources:
        return {}
    share = 1.0 / len(sources)
    return dict.fromkeys(sorted(sources), share)


def _optional_text(value: object, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"impression field {key!r} must be a string or null")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _version_1_item(entry: list[Any]) -> ShownItem:
    """An item of the version 1 form: `[item_id, position, team, [[name, rank], ...]]`."""
    item_id, position, team, sources = entry
    if not isinstance(item_id, str) or not _is_int(position):
        raise ValueError("an impression item's id must be a string and its position an int")
    if not isinstance(sources, list) or not all(
        isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and _is_int(s[1])
        for s in sources
    ):
        raise ValueError("an impression item's sources must be [[recommender, rank], ...]")
    return ShownItem(
        item_id, position, _optional_text(team, "team"), tuple(sorted({s[0] for s in sources}))
    )
