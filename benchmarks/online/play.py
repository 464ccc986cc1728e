"""The simulated users of `benchmarks.online`, and their side of HTTP with the gateway.

`play` runs visits through the gateway in rounds: each asks ``POST /recommendation``, the
user clicks on the fused list as the click model says, and the clicks go to ``POST
/feedback``; after every round ``GET /experiments`` is read, once it counts every impression
played (workers write them in batches), and kept as a snapshot. A visit is a (user, occasion):
`visits` gives users several, in a shuffled order, as users come back over an experiment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mock_recommenders.clicks import ClickModel

__all__ = [
    "ArmOf",
    "Played",
    "Rounds",
    "Snapshot",
    "Visit",
    "learning_arm",
    "play",
    "single_arm",
    "visits",
]


@dataclass
class Played:
    """One simulated visit played: what the gateway showed the user, and what they did."""

    index: int
    user: str
    occasion: int
    request_id: str
    arm: str
    fusion: str
    fused: list[str]
    lists: dict[str, list[str]]
    clicks: list[str]
    accepted: int = 0
    duplicates: int = 0


Snapshot = dict[str, Any]  # {"after": impressions played, "experiments": GET /experiments}
ArmOf = Callable[[dict[str, Any]], str]
Visit = tuple[str, int]  # (user, occasion: the user's 0th, 1st, ... visit)


def visits(prefix: str, count: int, mean: float, seed: int) -> list[Visit]:
    """`count` visits of users ``{prefix}{n}``, each user ~Geometric(1 / `mean`) visits, shuffled.

    Users are drawn until they have `count` visits between them; the visits are shuffled so
    that a user's come spread over the run (an experiment's users return over its days),
    and the last ones beyond `count` fall outside it. `mean` 1: one visit per user, in order.
    """
    if mean <= 1:
        return [(f"{prefix}{n}", 0) for n in range(count)]
    rng = np.random.default_rng([seed, count])
    drawn: list[Visit] = []
    users = 0
    while len(drawn) < count:
        drawn += [(f"{prefix}{users}", n) for n in range(int(rng.geometric(1 / mean)))]
        users += 1
    order = rng.permutation(len(drawn))
    return [drawn[i] for i in order[:count]]


# Talking to the gateway


class _Session:
    """The simulation's HTTP side: one aiohttp session for the gateway's three endpoints."""

    def __init__(self, base: str, k: int) -> None:
        import aiohttp

        self.base, self.k = base, k
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self._http.close()

    async def recommend(self, user: str, occasion: int) -> dict[str, Any]:
        # No `fusion` in the body: a request naming one is outside the experiment.
        body = {"user_id": user, "resultSize": self.k}
        # A request id per visit: interleaving is seeded by it, so a rerun shows the same lists.
        headers = {"X-Request-ID": f"online-{user}-{occasion}"}
        url = f"{self.base}/recommendation"
        async with self._http.post(url, json=body, headers=headers) as response:
            answer: dict[str, Any] = await response.json()
            if response.status != 200 or not answer.get("complete"):
                raise RuntimeError(f"/recommendation for {user}: {response.status} {answer}")
            return answer

    async def feedback(self, request_id: str, clicks: list[str]) -> tuple[int, int]:
        """POST the clicks as one batch; those refused (not yet stored) are sent again."""
        pending = [
            {"request_id": request_id, "item_id": item, "event": "click", "event_id": f"c-{item}"}
            for item in clicks
        ]
        accepted = duplicates = 0
        for attempt in range(20):
            async with self._http.post(f"{self.base}/feedback", json={"events": pending}) as reply:
                body = await reply.json()
            if reply.status == 202:
                accepted += int(body["accepted"])
                duplicates += int(body["duplicates"])
                pending = [pending[refused["index"]] for refused in body.get("rejected", [])]
                if not pending:
                    return accepted, duplicates
            # An impression is written within a flush interval; until then its clicks are
            # refused as unknown. The event ids would make a repeat count once anyway.
            await asyncio.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"/feedback refused {pending}: {reply.status} {body}")

    async def experiments(self) -> dict[str, Any]:
        async with self._http.get(f"{self.base}/experiments") as response:
            body: dict[str, Any] = await response.json()
            if response.status != 200:
                raise RuntimeError(f"/experiments: {response.status} {body}")
            return body

    async def settled(self, played: int) -> dict[str, Any]:
        """/experiments once it counts all `played` impressions (workers write them in batches)."""
        for _ in range(200):
            body = await self.experiments()
            if sum(arm["impressions"] for arm in body["arms"].values()) >= played:
                return body
            await asyncio.sleep(0.02)
        raise RuntimeError(f"/experiments still counts fewer than {played} impressions: {body}")


# The users


@dataclass(frozen=True)
class Rounds:
    """How `play` paces the users: round size, requests in flight, list length."""

    size: int
    concurrency: int
    k: int


async def play(
    base: str,
    schedule: list[Visit],
    model: ClickModel,
    arm_of: ArmOf,
    rounds: Rounds,
    advance: Callable[[str], None],
    label: str,
) -> tuple[list[Played], list[Snapshot]]:
    """Each visit once, in rounds of `rounds.size`; /experiments read after every round."""
    session = _Session(base, rounds.k)
    played: list[Played] = []
    snapshots: list[Snapshot] = []
    gate = asyncio.Semaphore(rounds.concurrency)

    async def one(index: int, user: str, occasion: int) -> Played:
        async with gate:
            answer = await session.recommend(user, occasion)
            fused = [str(item["id"]) for item in answer["fused"]]
            lists = {
                entry["name"]: [str(item["id"]) for item in entry["prediction"]["items"]]
                for entry in answer["result"]
            }
            clicks = model.clicks(user, fused, occasion if occasion else None)
            shown = Played(
                index, user, occasion, answer["request_id"], arm_of(answer), answer["fusion"],
                fused, lists, clicks,
            )  # fmt: skip
            if clicks:
                shown.accepted, shown.duplicates = await session.feedback(shown.request_id, clicks)
            return shown

    try:
        for start in range(0, len(schedule), rounds.size):
            batch = schedule[start : start + rounds.size]
            played += await asyncio.gather(
                *(one(start + n, user, occasion) for n, (user, occasion) in enumerate(batch))
            )
            experiments = await session.settled(len(played))
            snapshots.append({"after": len(played), "experiments": experiments})
            advance(f"{label}: {len(played)} of {len(schedule)} visits")
    finally:
        await session.close()
    return played, snapshots


def single_arm(answer: dict[str, Any]) -> str:
    """The sensitivity run's arm of an answer: interleaved, or the one recommender it showed."""
    if answer.get("arm"):
        return str(answer["arm"])
    if answer["fusion"] == "interleave":
        return "interleave"
    fused = [str(item["id"]) for item in answer["fused"]]
    for entry in answer["result"]:
        if [str(item["id"]) for item in entry["prediction"]["items"]][: len(fused)] == fused:
            return f"ab-{entry['name']}"
    return "mixed"


def learning_arm(answer: dict[str, Any]) -> str:
    """The learning run's arm of an answer: interleaved, or fused with the learnt weights."""
    if answer.get("arm"):
        return str(answer["arm"])
    return "interleave" if answer["fusion"] == "interleave" else "learned"
