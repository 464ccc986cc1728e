"""Request ids: the client's `X-Request-ID` when it is usable, else a new one."""

from __future__ import annotations

import os
import random

__all__ = ["REQUEST_ID_HEADER", "REQUEST_ID_MAX", "new_request_id", "valid_request_id"]

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_MAX = 128


def valid_request_id(value: str) -> bool:
    """Whether a client's `X-Request-ID` can be used as given: 1-128 visible ASCII characters."""
    # Visible ASCII is "!" to "~": printable ASCII but the space (str methods, in C).
    return (
        0 < len(value) <= REQUEST_ID_MAX
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


# 128 random bits, as in a version-4 UUID, from a generator seeded from the system's entropy
# (and seeded afresh in a forked worker): no system call per request, as `uuid4` makes.
_bits = random.Random()
os.register_at_fork(after_in_child=_bits.seed)


def new_request_id() -> str:
    """A fresh request id: 32 hex digits."""
    return f"{_bits.getrandbits(128):032x}"
