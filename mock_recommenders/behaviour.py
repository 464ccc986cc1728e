"""How a mock recommender behaves: its delay, and the faults it can be told to have."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Behaviour"]


@dataclass
class Behaviour:
    """A mock recommender's behaviour; changed at run time through the admin endpoint."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    status: int = 200
    not_json: bool = False
    hang: bool = False

    def delay_s(self, rng: random.Random) -> float:
        """This call's delay: the fixed part plus a uniform random share of the jitter."""
        jitter = rng.uniform(0, self.jitter_ms) if self.jitter_ms > 0 else 0.0
        return (self.delay_ms + jitter) / 1000

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply `changes`, all or none; `ValueError` names an unknown field or a wrong type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in fields:
                raise ValueError(f"unknown behaviour field {key!r}; known: {sorted(fields)}")
            default = fields[key].default
            if isinstance(default, bool):
                valid = isinstance(value, bool)
            elif isinstance(default, int):
                valid = isinstance(value, int) and not isinstance(value, bool)
                valid = valid and 100 <= value <= 599
            else:
                valid = isinstance(value, int | float) and not isinstance(value, bool)
                valid = valid and value >= 0
            if not valid:
                raise ValueError(f"behaviour field {key!r} cannot be {value!r}")
            checked[key] = float(value) if isinstance(default, float) else value
        for key, value in checked.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        """The behaviour as JSON-ready data."""
        return dataclasses.asdict(self)

    def copy(self) -> Behaviour:
        """An independent copy."""
        return dataclasses.replace(self)
