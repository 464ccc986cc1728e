"""Fusion gateway: one recommendation request fanned out to many recommenders, merged into one.

`create_app` builds the Flask app (`gateway.web.app`). gunicorn serves `gateway.asgi:app` (the
app on the uvicorn worker's event loop); `gateway.wsgi:app` is the same app for WSGI servers.

The package's subpackages are ranked, each importing only its own or lower ranks
(docs/architecture.md, tests/project/test_architecture.py). Importing `gateway` loads none of them:
`create_app` and the names below are loaded on first use (PEP 562), so `import gateway.sdk`
loads no Flask and `import gateway.config` no store or tracer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Settings, load_settings
    from gateway.web.app import create_app
    from gateway.web.flask_app import VIEW_GRACE_S, GatewayFlask

__all__ = ["VIEW_GRACE_S", "GatewayFlask", "Settings", "create_app", "load_settings"]

_WHERE = {
    "VIEW_GRACE_S": "gateway.web.flask_app",
    "GatewayFlask": "gateway.web.flask_app",
    "create_app": "gateway.web.app",
    "Settings": "gateway.config",
    "load_settings": "gateway.config",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # looked up once
    return value
