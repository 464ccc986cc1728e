"""The recommenders' HTTP client on the worker loop: one aiohttp `ClientSession` per worker.

`open_session` makes the worker's session from its pool settings, on the loop that serves
its requests (at the ASGI lifespan's startup, or on the gthread design's loop thread), and
`post` makes one call through it:

- one `TCPConnector` per worker: at most `limit` connections, `limit_per_host` to one
  origin, each kept `keepalive_timeout_s` idle, host names cached `dns_cache_ttl_s`; TLS
  with the system's CA certificates (or `ca_file`'s) and host names checked;
- no cookies (one session serves every user), no proxies or `.netrc` from the environment,
  no redirects followed, no timeouts of aiohttp's own: the caller bounds each call with its
  budget (`asyncio.timeout`), which covers waiting for a connection, connecting, sending and
  reading the whole answer;
- the answer's body is read as it arrives, still compressed (aiohttp's `auto_decompress` is
  off), by `gateway.recommenders.bodies.BodyReader`, within the call's `max_bytes` as sent and as
  decompressed; a failure part-way through the body is `Truncated`;
- a call that fails or is cancelled (a timeout, a lost hedge, an answer over its cap) closes
  its connection, which is never reused with an answer half-read.

Everything else fails as aiohttp raises it; `gateway.recommenders.clients` maps those to the
gateway's errors with one table.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping

import aiohttp
from yarl import URL

from gateway.config.settings import PoolSettings
from gateway.recommenders.bodies import ACCEPT_ENCODING, Answer, BodyReader, Truncated

__all__ = ["open_session", "post", "tls_context"]


@functools.cache
def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The default TLS context, with the system's CA certificates or `ca_file`'s; one per file."""
    return ssl.create_default_context(cafile=ca_file)


def open_session(pool: PoolSettings, user_agent: str) -> aiohttp.ClientSession:
    """The worker's session to the recommenders; make it on the loop that will use it."""
    connector = aiohttp.TCPConnector(
        limit=pool.limit,
        limit_per_host=pool.limit_per_host,
        keepalive_timeout=pool.keepalive_timeout_s,
        use_dns_cache=pool.dns_cache_ttl_s > 0,
        ttl_dns_cache=pool.dns_cache_ttl_s or None,
        ssl=tls_context(str(pool.ca_file) if pool.ca_file else None),
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={
            "User-Agent": user_agent,
            "Accept": "application/json",
            "Accept-Encoding": ACCEPT_ENCODING,
            "Content-Type": "application/json",
        },
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(),  # none: each call's budget bounds it
        auto_decompress=False,  # `BodyReader` decompresses, counting both sizes
        trust_env=False,
        raise_for_status=False,
    )


async def post(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes,
    headers: Mapping[str, str],
    max_bytes: int,
) -> Answer:
    """POST `body` (JSON) to `url`; the answer, its body read within `max_bytes`."""
    async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
        try:
            reader = BodyReader(response.headers, max_bytes)
            try:
                if reader.plain and reader.length is not None:
                    # Within the cap, as checked: the common answer, read at once.
                    reader.feed(await response.read())
                else:
                    async for piece in response.content.iter_any():
                        reader.feed(piece)
            except aiohttp.ClientError as exc:
                raise Truncated(f"the answer was cut off: {exc}") from exc
            return Answer(response.status, response.headers, reader.body())
        except BaseException:
            response.close()  # cut short or refused: never reused half-read
            raise
