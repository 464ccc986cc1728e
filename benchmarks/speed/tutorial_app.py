"""The reference the harness compares against: the fan-out most tutorials write.

An ``async def`` Flask view run by Flask's default `async_to_sync` (asgiref: a new event loop
per request), opening a new `aiohttp.ClientSession` for every recommender call: no shared
connection pool, a TCP handshake per call. Served as tutorials serve it, by gunicorn with
``(2 x cores) + 1`` sync workers and ``preload_app`` (`tutorial_gunicorn.conf.py`). It is
here to be measured, not used.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import aiohttp
from flask import Flask, jsonify, request

__all__ = ["app"]

RECOMMENDERS: list[dict[str, Any]] = json.loads(os.environ["GATEWAY_RECOMMENDERS"])

app = Flask(__name__)


@app.post("/recommendation")
async def recommendation() -> Any:
    """Fan out with a new session per call, as the tutorials do."""
    body = request.get_json()

    async def call(recommender: dict[str, Any]) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                recommender["url"], json=body, timeout=aiohttp.ClientTimeout(total=1)
            ) as response,
        ):
            return {"name": recommender["name"], "prediction": await response.json()}

    answers = await asyncio.gather(*(call(r) for r in RECOMMENDERS), return_exceptions=True)
    result = [answer for answer in answers if not isinstance(answer, BaseException)]
    return jsonify(result=result, complete=len(result) == len(RECOMMENDERS))


@app.get("/readyz")
def readyz() -> Any:
    """Ready as soon as it is imported."""
    return jsonify(status="ready")
