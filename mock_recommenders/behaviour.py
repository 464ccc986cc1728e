"""How a mock recommender behaves: its delay, and the faults it can be told to have.

Effects apply to each ``POST /test`` in this order:

1. the delay: `delay_ms`, plus up to `jitter_ms`, plus `slow_ms` with probability `slow_rate`
   (a slow tail);
2. `hang`: answer nothing until `hang` is switched off (the hanging calls then go on) or the
   mock stops;
3. `reset`: send the headers and part of the body, then reset the connection;
4. `fail_first`: the first N calls after it was set answer `error_status`;
5. `status`: when not 200, every call answers it;
6. `error_rate`: with that probability, answer `error_status`;
7. `not_json`: answer 200 with a body that is not JSON;
8. otherwise, the ranked list.

Error answers carry `Retry-After: retry_after_s` when it is set.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Behaviour"]


def _number(low: float, high: float | None = None) -> Callable[[Any], bool]:
    def valid(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        # Infinity would hang a call forever (that is what `hang` is for) or break Retry-After.
        return math.isfinite(value) and low <= value and (high is None or value <= high)

    return valid


def _integer(low: int, high: int | None = None) -> Callable[[Any], bool]:
    def valid(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and _number(low, high)(value)

    return valid


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


_VALID: dict[str, Callable[[Any], bool]] = {
    "delay_ms": _number(0),
    "jitter_ms": _number(0),
    # No 1xx: those are not final answers, and aiohttp cannot send them as one.
    "status": _integer(200, 599),
    "not_json": _flag,
    "hang": _flag,
    "error_rate": _number(0, 1),
    "error_status": _integer(400, 599),
    "retry_after_s": lambda value: value is None or _number(0)(value),
    "slow_rate": _number(0, 1),
    "slow_ms": _number(0),
    "reset": _flag,
    "fail_first": _integer(0),
}


@dataclass
class Behaviour:
    """A mock recommender's behaviour; changed at run time through the admin endpoint."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    status: int = 200
    not_json: bool = False
    hang: bool = False
    error_rate: float = 0.0
    error_status: int = 503
    retry_after_s: float | None = None
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    reset: bool = False
    fail_first: int = 0

    def delay_s(self, rng: random.Random) -> float:
        """This call's delay: the fixed part, a share of the jitter, and maybe the slow tail."""
        delay = self.delay_ms
        # Zero knobs never touch the generator: the benchmarks run through here.
        if self.jitter_ms > 0:
            delay += rng.uniform(0, self.jitter_ms)
        if self.slow_rate > 0 and rng.random() < self.slow_rate:
            delay += self.slow_ms
        return delay / 1000

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply `changes`, all or none; `ValueError` names an unknown field or a wrong value."""
        for key, value in changes.items():
            if key not in _VALID:
                raise ValueError(f"unknown behaviour field {key!r}; known: {sorted(_VALID)}")
            if not _VALID[key](value):
                raise ValueError(f"behaviour field {key!r} cannot be {value!r}")
        for key, value in changes.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        """The behaviour as JSON-ready data."""
        return dataclasses.asdict(self)

    def copy(self) -> Behaviour:
        """An independent copy."""
        return dataclasses.replace(self)
