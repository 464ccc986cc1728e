"""The feedback stores' URLs, checked and described without I/O and without the stores' code.

`sqlite:///PATH` (the embedded store) or `redis://host:port/N`; the settings check them at
start-up (`gateway.config.feedback`), and `gateway.feedback.store.open_store` opens the store
one names.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

__all__ = ["check_store_url", "describe_store_url"]


def check_store_url(url: str) -> Literal["sqlite", "redis"]:
    """Which store a URL names, ``sqlite:///PATH`` or ``redis://host:port/N``, without I/O.

    ValueError, naming what is wrong, for any other URL: the settings call it at start-up,
    so a bad URL stops the gateway before any worker forks.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise ValueError(
                f"feedback store URL {url!r}: a SQLite URL has no host; write sqlite:///PATH "
                "(three slashes, then a relative path) or sqlite:////abs/path"
            )
        path = parts.path[1:]
        if not path or path.endswith("/"):
            raise ValueError(f"feedback store URL {url!r} names no SQLite file")
        if parts.query or parts.fragment:
            raise ValueError(f"feedback store URL {url!r}: SQLite takes no query or fragment")
        return "sqlite"
    if parts.scheme == "redis":
        if not parts.hostname:
            raise ValueError(f"feedback store URL {url!r} names no Redis host")
        try:
            parts.port  # noqa: B018 - a property that raises on a bad port
        except ValueError as exc:
            # The gateway's own words: urllib's are for any Python version to reword.
            raise ValueError(
                f"feedback store URL {url!r}: the port must be a number from 0 to 65535"
            ) from exc
        database = parts.path.lstrip("/")
        if database and not database.isdigit():
            raise ValueError(
                f"feedback store URL {url!r}: the Redis database must be a number, got {database!r}"
            )
        return "redis"
    raise ValueError(
        f"feedback store URL {url!r}: scheme {parts.scheme!r} is not supported; "
        "use sqlite:///PATH or redis://host:port/N"
    )


def describe_store_url(url: str) -> str:
    """The store a valid URL names, for people: its kind and place, never its credentials
    (a Redis URL may carry a password): ``sqlite PATH`` or ``redis HOST:PORT/N``."""
    parts = urlsplit(url)
    if check_store_url(url) == "sqlite":
        return f"sqlite {parts.path[1:]}"
    return f"redis {parts.hostname}:{parts.port or 6379}/{parts.path.lstrip('/') or '0'}"
