"""Tests of the worker runtime: one loop per process, views run on it, lifetimes explicit."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import requests
from flask import Response, g, jsonify, request

from gateway.core.errors import ClientClosedError
from gateway.web.app import GatewayFlask, create_app
from gateway.web.exchange import current_exchange
from mock_recommenders import MockFleet
from tests.helpers import Serve, settings_for


def _request_id() -> str:
    exchange = current_exchange()
    assert exchange is not None
    return exchange.request_id


def probe_app(fleet: MockFleet) -> GatewayFlask:
    """The gateway with a `/probe` view that reports where it ran and what it saw."""
    app = create_app(settings_for(fleet))

    @app.before_request
    def mark() -> None:
        g.marked_by = "before_request"

    @app.get("/probe")
    async def probe() -> Response:
        await asyncio.sleep(0)
        g.set_by_view = request.headers.get("X-Probe")
        return jsonify(
            thread=threading.current_thread().name,
            loop=id(asyncio.get_running_loop()),
            header=request.headers.get("X-Probe"),
            marked_by=g.get("marked_by"),
            request_id=_request_id(),
        )

    @app.after_request
    def echo(response: Response) -> Response:
        # What the async view put in `g` is there after it, in Flask's own code.
        response.headers["X-Set-By-View"] = str(g.get("set_by_view"))
        return response

    return app


def probe(url: str, count: int) -> list[requests.Response]:
    return [
        requests.get(f"{url}/probe", headers={"X-Probe": str(i)}, timeout=30) for i in range(count)
    ]


def test_async_views_are_awaited_on_the_serving_loop_with_the_request_context(
    fleet: MockFleet, serve: Serve
) -> None:
    app = probe_app(fleet)
    url = serve(app)

    responses = probe(url, 5)

    answers = [response.json() for response in responses]
    # The loop that serves HTTP, in its own thread: no other thread, no hop.
    assert {a["loop"] for a in answers} == {id(app.runtime.loop)}
    assert {a["thread"] for a in answers} == {"gateway-server"}
    assert not app.runtime.on_loop_thread
    assert [a["header"] for a in answers] == [str(i) for i in range(5)]
    assert [r.headers["X-Set-By-View"] for r in responses] == [str(i) for i in range(5)]
    assert {a["marked_by"] for a in answers} == {"before_request"}
    assert len({a["request_id"] for a in answers}) == 5


def test_served_as_wsgi_async_views_run_on_the_loop_thread(
    fleet: MockFleet, serve_wsgi: Serve
) -> None:
    app = probe_app(fleet)
    url = serve_wsgi(app)

    responses = probe(url, 3)

    answers = [response.json() for response in responses]
    assert {a["loop"] for a in answers} == {id(app.runtime.loop)}
    assert {a["thread"] for a in answers} == {f"gateway-loop-{os.getpid()}"}
    assert app.runtime.on_loop_thread
    assert [r.headers["X-Set-By-View"] for r in responses] == ["0", "1", "2"]
    assert {a["marked_by"] for a in answers} == {"before_request"}


def test_the_runtime_starts_afresh_in_a_forked_process(
    fleet: MockFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings_for(fleet))
    app.runtime.start()
    parent_loop = app.runtime.loop
    (parent_client, *_) = app.runtime.clients
    # What a worker forked from a preloading master sees: the same objects, another pid.
    monkeypatch.setattr("gateway.runtime.worker_runtime.os.getpid", lambda: -1)
    with pytest.raises(RuntimeError, match="not started in this process"):
        _ = app.runtime.loop  # the parent's state is not the child's, and nothing starts

    app.runtime.start()
    child_loop = app.runtime.loop

    assert child_loop is not parent_loop
    assert child_loop.is_running()
    assert app.runtime.started
    assert app.runtime.clients[0] is not parent_client
    app.runtime.close()
    assert not child_loop.is_running()
    assert parent_loop.is_running()  # the "parent's" loop is not the child's to stop

    monkeypatch.undo()
    app.runtime.close()
    assert not parent_loop.is_running()


def test_after_close_the_clients_refuse_to_be_used(fleet: MockFleet) -> None:
    app = create_app(settings_for(fleet))
    runtime = app.runtime
    runtime.start()
    (client, *_) = runtime.clients
    loop = runtime.loop

    runtime.close()
    threads = threading.active_count()

    assert not runtime.started
    assert not loop.is_running()
    with pytest.raises(ClientClosedError, match="sml"):
        asyncio.run(client.recommend(b"{}", {}))
    with pytest.raises(RuntimeError, match="closed"):
        runtime.start()
    with pytest.raises(RuntimeError, match="closed"):
        _ = runtime.clients
    assert threading.active_count() == threads  # no accessor started a loop thread again
    runtime.close()  # idempotent


def test_the_accessors_start_nothing(fleet: MockFleet) -> None:
    runtime = create_app(settings_for(fleet)).runtime
    threads = threading.active_count()

    for accessor in ("clients", "strategy", "guards", "tracing", "loop"):
        with pytest.raises(RuntimeError, match="not started in this process"):
            getattr(runtime, accessor)

    assert threading.active_count() == threads
    assert not runtime.started
    runtime.start()
    assert runtime.started and runtime.on_loop_thread
    runtime.close()


def test_readiness_reports_a_closed_runtime(fleet: MockFleet, serve: Serve) -> None:
    app = create_app(settings_for(fleet))
    url = serve(app)
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200

    app.runtime.close()

    response = requests.get(f"{url}/readyz", timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "recommender session is not open"
