"""``python -m benchmarks clients``: what one recommender call costs the gateway in CPU, per client.

The fan-out strategies differ in how they wait; each call also costs the client's own CPU, on
the worker loop (async) or in a pool thread (threads, sequential). This measures that cost
alone, in one process, against a mock recommender in another that answers at once (so the
server's time is not the client's), with a 10-item answer as the mocks give it:

- ``aiohttp-session``: the async strategy's client, `gateway.recommenders.async_http.post` over the
  worker's one session, 4 calls at a time with `asyncio.gather` (as a request with 4 recommenders),
  on
  uvloop: CPU of the process per call;
- ``aiohttp-per-call-session``: the tutorials' client, a new `aiohttp.ClientSession` per call
  (a TCP handshake each), 4 at a time;
- ``thread-sessions``: the threads and sequential strategies' client,
  `gateway.recommenders.blocking_http.ThreadSessions.post`, from one thread, one call after another:
  CPU of the process (the watchdog thread included) per call;
- ``requests-session``: a plain `requests.Session().post` from one thread, for reference;
- ``protocol-native``, ``protocol-kserve-v1``, ``protocol-open-inference``: a whole
  recommender call as the async strategy makes it
  (`gateway.recommenders.clients.RecommenderClient.recommend`: the body in the recommender's
  protocol, the call, the answer parsed within its limits and
  read as a native one), to the same mock over its `/test`, KServe V1 and Open Inference
  endpoints, 4 at a time on uvloop: what each protocol's mapping costs a call
  (`gateway.core.protocols`).

Each client makes `--calls` calls per run after a warm-up, `--runs` times; the table gives
the median CPU per call and the range. Results go to ``benchmarks/results/<time>/clients.json``
and ``clients.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import requests
from yarl import URL

from benchmarks.harness.servers import mocks
from gateway.config.settings import PoolSettings
from gateway.core.protocols import KSERVE_V1, NATIVE, OpenInference, WireProtocol
from gateway.recommenders import async_http
from gateway.recommenders.blocking_http import ThreadSessions
from gateway.recommenders.clients import RecommenderClient

__all__ = ["CLIENTS", "main", "measure"]

BODY = json.dumps({"user_id": "u1", "resultSize": 10}).encode()
HEADERS = {"X-Request-ID": "bench"}
AT_ONCE = 4  # calls in flight together on the loop: one request's fan-out
MAX_BYTES = 1 << 20


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _timed_on_loop(
    calls: int, make: Callable[[aiohttp.ClientSession], Callable[[], Awaitable[None]]]
) -> float:
    """CPU seconds of `calls` calls of `make(session)`, `AT_ONCE` at a time, on a fresh loop,
    after a warm-up; `session` is the gateway's own, made for the run."""

    async def run() -> float:
        session = async_http.open_session(PoolSettings(), "fusion-gateway/bench")
        one = make(session)
        try:
            for _ in range(20):  # warm-up: connections made, caches filled
                await asyncio.gather(*(one() for _ in range(AT_ONCE)))
            started = time.process_time()
            for _ in range(calls // AT_ONCE):
                await asyncio.gather(*(one() for _ in range(AT_ONCE)))
            return time.process_time() - started
        finally:
            await session.close()

    loop = _loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def _on_loop(calls: int, url: str, per_call_session: bool) -> float:
    """CPU seconds of `calls` calls, `AT_ONCE` at a time, on a fresh loop."""
    target = URL(url)

    def make(session: aiohttp.ClientSession) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            if per_call_session:
                async with (
                    aiohttp.ClientSession() as own,
                    own.post(target, data=BODY, headers=HEADERS) as answer,
                ):
                    await answer.read()
            else:
                await async_http.post(session, target, BODY, HEADERS, MAX_BYTES)

        return one

    return _timed_on_loop(calls, make)


def _protocol_calls(calls: int, url: str, protocol: WireProtocol) -> float:
    """CPU seconds of `calls` whole recommender calls in `protocol`, `AT_ONCE` at a time."""
    base, model = url.removesuffix("/test"), "sml"  # the mock serves every protocol
    endpoint = {
        NATIVE.name: url,
        KSERVE_V1.name: f"{base}/v1/models/{model}:predict",
        OpenInference.name: f"{base}/v2/models/{model}/infer",
    }[protocol.name]
    headers = {"X-Request-ID": "bench-request-id"}

    def make(session: aiohttp.ClientSession) -> Callable[[], Awaitable[None]]:
        client = RecommenderClient(model, endpoint, session, 5.0, protocol=protocol)

        async def one() -> None:
            answer = await client.recommend(BODY, headers)
            assert len(answer["items"]) == 10

        return one

    return _timed_on_loop(calls, make)


def _in_a_thread(calls: int, url: str, plain: bool) -> float:
    """CPU seconds of `calls` calls, one after another, from this thread."""
    sessions = ThreadSessions(user_agent="fusion-gateway/bench")
    session = requests.Session()

    def one() -> None:
        if plain:
            session.post(url, data=BODY, headers=HEADERS, timeout=5).content  # noqa: B018
        else:
            sessions.post(url, BODY, HEADERS, 5.0, MAX_BYTES)

    try:
        for _ in range(20):
            one()
        started = time.process_time()
        for _ in range(calls):
            one()
        return time.process_time() - started
    finally:
        sessions.close()
        session.close()


CLIENTS: dict[str, Callable[[int, str], float]] = {
    "aiohttp-session": lambda calls, url: _on_loop(calls, url, per_call_session=False),
    "aiohttp-per-call-session": lambda calls, url: _on_loop(calls, url, per_call_session=True),
    "thread-sessions": lambda calls, url: _in_a_thread(calls, url, plain=False),
    "requests-session": lambda calls, url: _in_a_thread(calls, url, plain=True),
    "protocol-native": lambda calls, url: _protocol_calls(calls, url, NATIVE),
    "protocol-kserve-v1": lambda calls, url: _protocol_calls(calls, url, KSERVE_V1),
    "protocol-open-inference": lambda calls, url: _protocol_calls(calls, url, OpenInference()),
}


def measure(url: str, calls: int, runs: int, clients: list[str]) -> list[dict[str, Any]]:
    """Each client's CPU per call, in µs, over `runs` runs of `calls` calls (interleaved)."""
    seen: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(runs):
        for name in clients:  # interleaved: a busy moment costs every client alike
            seen[name].append(CLIENTS[name](calls, url) / calls * 1e6)
    return [
        {
            "client": name,
            "cpu_us_per_call": round(statistics.median(values), 1),
            "min_us": round(min(values), 1),
            "max_us": round(max(values), 1),
            "runs": runs,
            "calls": calls,
        }
        for name, values in seen.items()
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| client | CPU per call (µs, median) | range (µs) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['client']} | {r['cpu_us_per_call']:.0f} | {r['min_us']:.0f}-{r['max_us']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, print and save each client's CPU per call."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks clients", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per run (default 2000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per client (default 5)")
    parser.add_argument(
        "--clients", default=",".join(CLIENTS), help=f"a subset of {','.join(CLIENTS)}"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    unknown = sorted(set(clients) - set(CLIENTS))
    if unknown:
        parser.error(f"unknown clients: {', '.join(unknown)}")
    out = args.out or Path("benchmarks/results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with mocks(["sml"], out / "mocks.log", "--delay-ms", "0") as fleet:
        rows = measure(fleet.url("sml"), args.calls, args.runs, clients)
    results = {
        "python": sys.version.split()[0],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    (out / "clients.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "clients.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"written: {out / 'clients.json'}, {out / 'clients.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
