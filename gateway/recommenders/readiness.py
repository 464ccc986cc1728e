"""Whether the recommenders' model servers say they are ready, asked in their protocols.

Each recommender's readiness URLs come from its settings (`RecommenderSettings.readiness_urls`):
`ready_url` when given, else its protocol's own (KServe V1 `GET /v1/models/{m}`, Open Inference
`GET /v2/models/{m}/ready`); a recommender of the gateway's own protocol without `ready_url`
is not asked. A replica is ready when its URL answers 2xx within the time given; a recommender
is ready when one of its replicas is (a call goes to any of them). `/readyz?probe=recommenders`
(or `readiness.probe_recommenders: true`, for every `/readyz`) and `python -m gateway
check-config --probe` ask them all at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from gateway.config.settings import RecommenderSettings

__all__ = ["RecommenderReadiness", "ReplicaReadiness", "probe", "summary"]


@dataclass(frozen=True, slots=True)
class ReplicaReadiness:
    """What one readiness URL answered: its status, or why there was none."""

    url: str
    status: int | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        """Whether it answered 2xx."""
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        """What it answered, for a person: `GET <url>: HTTP 503`."""
        said = f"HTTP {self.status}" if self.status is not None else self.error
        return f"GET {self.url}: {said}"

    def as_dict(self) -> dict[str, object]:
        """As `/readyz` shows it."""
        shown: dict[str, object] = {"url": self.url, "ready": self.ready}
        if self.status is not None:
            shown["status"] = self.status
        if self.error is not None:
            shown["error"] = self.error
        return shown


@dataclass(frozen=True, slots=True)
class RecommenderReadiness:
    """One recommender's readiness: each replica's answer, or none asked (`probed` False)."""

    name: str
    protocol: str
    replicas: tuple[ReplicaReadiness, ...]

    @property
    def probed(self) -> bool:
        """Whether it has a readiness URL to ask."""
        return bool(self.replicas)

    @property
    def ready(self) -> bool:
        """Ready when one of its replicas is; one not asked counts as ready."""
        return not self.replicas or any(r.ready for r in self.replicas)

    def as_dict(self) -> dict[str, object]:
        """As `/readyz` shows it."""
        if not self.probed:
            return {"protocol": self.protocol, "probed": False}
        return {
            "protocol": self.protocol,
            "probed": True,
            "ready": self.ready,
            "replicas": [r.as_dict() for r in self.replicas],
        }


async def probe(
    session: aiohttp.ClientSession,
    recommenders: Sequence[RecommenderSettings],
    timeout_s: float,
) -> list[RecommenderReadiness]:
    """Ask every readiness URL of `recommenders` at once, each within `timeout_s`."""
    urls = [r.readiness_urls() for r in recommenders]
    answers = await asyncio.gather(
        *(
            _ask(session, url, r.headers, timeout_s)
            for r, group in zip(recommenders, urls, strict=True)
            for url in group
        )
    )
    found = iter(answers)
    return [
        RecommenderReadiness(r.name, r.protocol, tuple(next(found) for _ in group))
        for r, group in zip(recommenders, urls, strict=True)
    ]


def summary(readiness: Sequence[RecommenderReadiness]) -> str:
    """The recommenders not ready and what each answered, on one line ('' if all are)."""
    return "; ".join(
        f"{r.name} ({', '.join(replica.describe() for replica in r.replicas)})"
        for r in readiness
        if not r.ready
    )


async def _ask(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str], timeout_s: float
) -> ReplicaReadiness:
    try:
        async with (
            asyncio.timeout(timeout_s),
            session.get(url, headers=headers, allow_redirects=False) as answer,
        ):
            return ReplicaReadiness(url, status=answer.status)
    except TimeoutError:
        return ReplicaReadiness(url, error=f"no answer within {timeout_s * 1000:.0f} ms")
    except aiohttp.ClientConnectorError as exc:
        errno = exc.os_error.errno
        why = os.strerror(errno) if errno and errno > 0 else str(exc.os_error) or "failed"
        return ReplicaReadiness(url, error=f"cannot connect: {why}")
    except (aiohttp.ClientError, OSError) as exc:
        return ReplicaReadiness(url, error=" ".join(str(exc).split()) or type(exc).__name__)
