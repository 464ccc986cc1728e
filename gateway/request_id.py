"""Request ids: the client's `X-Request-ID` when it is usable, else a new one."""

from __future__ import annotations

import uuid

__all__ = ["REQUEST_ID_HEADER", "REQUEST_ID_MAX", "new_request_id", "valid_request_id"]

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_MAX = 128


def valid_request_id(value: str) -> bool:
    """Whether a client's `X-Request-ID` can be used as given: 1-128 visible ASCII characters."""
    return 0 < len(value) <= REQUEST_ID_MAX and all("!" <= c <= "~" for c in value)


def new_request_id() -> str:
    """A fresh request id: 32 hex digits."""
    return uuid.uuid4().hex
